"""Tests for the on-disk record of off-site copies and the cloud key parsing of recover."""

from __future__ import annotations

from pathlib import Path

from collector.offsite import state
from collector.offsite.recover import _parse_ref


def test_a_copy_recorded_survives_a_reload_and_clears_the_error_streak(tmp_path: Path) -> None:
    state.record_error(tmp_path, "b2", "AccessDenied")
    state.record_error(tmp_path, "b2", "AccessDenied")
    assert state.load(tmp_path, "b2").failures_in_a_row == 2
    state.mark_copied(tmp_path, "b2", "db1/hospital/hospital_20261126.sql.zst", {"size": 3})
    loaded = state.load(tmp_path, "b2")
    assert loaded.copied == {"db1/hospital/hospital_20261126.sql.zst": {"size": 3}}
    assert loaded.failures_in_a_row == 0 and loaded.last_error is None


def test_targets_keep_separate_records(tmp_path: Path) -> None:
    state.mark_copied(tmp_path, "b2", "db1/a/a_20261126.sql.zst", {})
    assert state.load(tmp_path, "ceph").copied == {}


def test_an_unreadable_record_means_copy_everything_again(tmp_path: Path) -> None:
    (tmp_path / state.state_file("b2")).write_text("{not json")
    assert state.load(tmp_path, "b2").copied == {}


def test_forget_drops_only_the_named_refs(tmp_path: Path) -> None:
    for ref in ("db1/a/a_20261126.sql.zst", "db1/a/a_20261127.sql.zst"):
        state.mark_copied(tmp_path, "b2", ref, {})
    state.forget(tmp_path, "b2", ["db1/a/a_20261126.sql.zst"])
    assert list(state.load(tmp_path, "b2").copied) == ["db1/a/a_20261127.sql.zst"]


def test_recover_reads_agent_database_and_name_from_a_cloud_key() -> None:
    item = _parse_ref("db1/sp%20ace/sp%20ace_20261126-2.sql.zst")
    assert item is not None
    assert (item.agent, item.database, item.ext) == ("db1", "sp ace", "sql.zst")


def test_recover_ignores_keys_that_could_leave_the_store() -> None:
    assert _parse_ref("../etc/passwd_20261126.sql.zst") is None
    assert _parse_ref("db1/../hospital_20261126.sql.zst") is None
    assert _parse_ref("db1/hospital/other_20261126.sql.zst") is None
    assert _parse_ref("db1/hospital/hospital_20261126.sql.zst/x") is None
