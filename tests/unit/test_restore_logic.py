"""The pure parts of restore and drill: which backup, scratch names, and the comparisons."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from agent.restore.drill import DrillResult, compare_collections, compare_tables, scratch_name
from agent.restore.restore import NoBackupError, choose_backup
from common.errors import ExitCode


def summary(name: str, *, engine: str = "mysql", verified: bool = True) -> dict[str, Any]:
    database = name.split("_")[0]
    return {
        "name": name,
        "database": database,
        "engine": engine,
        "verified": verified,
        "size": 10,
        "sha256": "0" * 64,
    }


LISTING = [
    summary("hospital_20261124.sql.zst"),
    summary("hospital_20261125.sql.zst"),
    summary("hospital_20261125-2.sql.zst"),
    summary("hospital_20261126.sql.zst", verified=False),
    summary("hospital_20261126.archive.gz", engine="mongodb"),
]


def test_newest_verified_backup_of_the_engine_is_chosen() -> None:
    assert choose_backup(LISTING, "hospital", "mysql")["name"] == "hospital_20261125-2.sql.zst"
    assert choose_backup(LISTING, "hospital", "mongodb")["name"] == "hospital_20261126.archive.gz"


def test_date_chooses_that_days_newest() -> None:
    chosen = choose_backup(LISTING, "hospital", "mysql", date(2026, 11, 24))
    assert chosen["name"] == "hospital_20261124.sql.zst"


def test_no_backup_on_a_date_lists_the_days_there_are() -> None:
    with pytest.raises(NoBackupError, match=r"from 20260101 .*20261125"):
        choose_backup(LISTING, "hospital", "mysql", date(2026, 1, 1))


def test_other_databases_and_foreign_names_are_ignored() -> None:
    listing = [summary("billing_20261126.sql.zst"), {"name": "../etc/passwd", "database": "x"}]
    with pytest.raises(NoBackupError, match="no mysql backup of hospital"):
        choose_backup(listing, "hospital", "mysql")


def test_scratch_names_are_safe_and_bounded() -> None:
    assert scratch_name("hospital", "abcd1234") == "backhaul_drill_hospital_abcd1234"
    odd = scratch_name("a/b.c d-ünï" * 10, "abcd1234")
    assert len(odd) <= 63
    assert odd.startswith("backhaul_drill_a_b_c_d_")
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in odd)


def checksums(tables: dict[str, list[int]], unchanged: bool | None = True) -> dict[str, Any]:
    return {
        "tables": len(tables),
        "checksums": {"taken": "before_dump", "fields": ["rows", "checksum"], "tables": tables},
        "binlog_unchanged": unchanged,
    }


RESTORED = {"a": {"rows": 2, "checksum": 11}, "b": {"rows": 0, "checksum": 0}}


def test_matching_tables_pass() -> None:
    result = compare_tables(checksums({"a": [2, 11], "b": [0, 0]}), RESTORED)
    assert result.ok and "match" in result.message


@pytest.mark.parametrize(
    ("recorded", "complaint"),
    [
        ({"a": [3, 11], "b": [0, 0]}, "`a` has 2 rows, recorded 3"),
        ({"a": [2, 12], "b": [0, 0]}, "`a` checksum 11, recorded 12"),
        ({"a": [2, 11]}, "`b` not in the backup's record"),
        ({"a": [2, 11], "b": [0, 0], "c": [1, 1]}, "`c` missing"),
        ({"a": "junk", "b": [0, 0]}, "`a` has no usable record"),
    ],
)
def test_differences_fail_when_the_server_was_quiet(
    recorded: dict[str, Any], complaint: str
) -> None:
    result = compare_tables(checksums(recorded), RESTORED)
    assert not result.ok
    assert complaint.replace("`", "") in result.message


def test_differences_are_not_judged_when_the_server_saw_writes() -> None:
    """A write between the checksums and the dump is not damage: not compared, and said."""
    result = compare_tables(checksums({"a": [3, 99]}, unchanged=False), RESTORED)
    assert result.ok
    assert "not compared" in result.message


def test_differences_fail_with_a_note_when_writes_cannot_be_ruled_out() -> None:
    result = compare_tables(checksums({"a": [3, 11], "b": [0, 0]}, unchanged=None), RESTORED)
    assert not result.ok
    assert "binary log is off" in result.message


def test_without_recorded_checksums_the_table_count_is_compared() -> None:
    assert compare_tables({"tables": 2}, RESTORED).ok
    result = compare_tables({"tables": 3, "checksums_skipped": "900 tables"}, RESTORED)
    assert not result.ok and "recorded 3" in result.message


def test_collections_compare_document_counts_and_skip_views() -> None:
    dump = {
        "collections": {
            "beds": {"type": "collection", "documents": 250},
            "staff": {"type": "collection", "documents": 3},
            "by_ward": {"type": "view"},
        }
    }
    assert compare_collections(dump, {"beds": 250, "staff": 3, "system.views": 1}).ok
    short = compare_collections(dump, {"beds": 249, "staff": 3})
    assert not short.ok and "beds has 249 documents, the dump wrote 250" in short.message
    missing = compare_collections(dump, {"beds": 250})
    assert not missing.ok and "staff missing" in missing.message


def test_drill_exit_codes_follow_the_error_families() -> None:
    assert DrillResult(True, "ok", "").exit_code == ExitCode.OK
    assert DrillResult(False, "mismatch", "").exit_code == ExitCode.INTEGRITY
    assert DrillResult(False, "integrity", "").exit_code == ExitCode.INTEGRITY
    assert DrillResult(False, "restore", "").exit_code == ExitCode.DUMP
    assert DrillResult(False, "no_backup", "").exit_code == ExitCode.FAILED
