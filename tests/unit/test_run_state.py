"""The agent's per-database run records: written atomically, read back, and a damaged or
missing record is a warning and a fresh start, never a crash."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.run_state import RunRecord, RunState

T1 = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)
T2 = datetime(2026, 11, 26, 1, 31, 12, tzinfo=UTC)


def test_records_are_read_back_per_database(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    state.record("main", "hospital", scheduled=T1)
    state.record("main", "hospital", success=T2)
    state.record("main", "a/b ü", scheduled=T2)
    assert state.load("main", "hospital") == RunRecord("main", "hospital", T1, T2)
    assert state.load("main", "a/b ü") == RunRecord("main", "a/b ü", T2, None)
    assert state.load("main", "other") is None
    assert sorted(state.databases("main")) == ["a/b ü", "hospital"]
    assert state.databases("nowhere") == []


def test_a_write_leaves_no_temporary_file_and_a_private_file(tmp_path: Path) -> None:
    state = RunState(tmp_path)
    state.record("main", "hospital", scheduled=T1)
    path = state.path("main", "hospital")
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.stat().st_mode & 0o077 == 0
    assert json.loads(path.read_text())["last_scheduled"] == "2026-11-26T01:30:00+00:00"


@pytest.mark.parametrize(
    "content",
    [b"", b'{"version": 1, "source": "main", "datab', b"\xff\xfe garbage", b"[]",
     b'{"version": 1, "source": "main", "database": "hospital", "last_scheduled": 5}',
     b'{"version": 1, "source": "main", "database": "other"}'],
    ids=["empty", "truncated", "binary", "not-an-object", "bad-time", "another-database"],
)
def test_a_damaged_record_is_a_warning_and_a_fresh_start(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    state = RunState(tmp_path)
    state.record("main", "hospital", scheduled=T1)
    state.path("main", "hospital").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert state.load("main", "hospital") is None
    assert "is damaged" in caplog.text and "starting afresh for main/hospital" in caplog.text
    state.record("main", "hospital", success=T2)  # and the next run writes a good one
    assert state.load("main", "hospital") == RunRecord("main", "hospital", None, T2)


def test_an_unwritable_state_directory_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        RunState(blocker / "state").record("main", "hospital", scheduled=T1)
    assert "cannot write the run record" in caplog.text
