"""The agent service's pending retries and catch-ups on a fake clock: when each is due,
what drops it, and the log lines they leave (under the service's logger name)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import SourceConfig
from agent.run_state import RunState
from agent.schedule import parse_schedule
from agent.second_chances import SecondChances
from common.errors import CollectorUnreachableError, ConfigError

SOURCE = SourceConfig("main", "mysql", ("hospital",), schedule="daily 02:30",
                      retry_failed=2, retry_interval=600.0)
FIRE = datetime(2026, 11, 26, 2, 30, tzinfo=UTC)
NOW = FIRE.timestamp() + 60
UNREACHABLE = CollectorUnreachableError("cannot reach collector at 127.0.0.1:2222")


def chances(tmp_path: Path) -> SecondChances:
    return SecondChances(RunState(tmp_path), UTC)


def fail(second: SecondChances, cause: BaseException, failures: int = 1) -> bool:
    return second.after_failure(SOURCE, "hospital", FIRE, failures, cause, str(cause),
                                now=NOW, next_scheduled=NOW + 86400)


def test_a_retried_failure_is_due_after_its_wait_and_taken_once(tmp_path: Path) -> None:
    second = chances(tmp_path)
    assert fail(second, UNREACHABLE)
    assert second.starts() == [NOW + 600]
    assert second.due(NOW + 599) == []
    ((key, pending),) = second.due(NOW + 600)
    assert key == ("main", "hospital")
    assert (pending.fire, pending.failures) == (FIRE, 1)
    assert second.due(NOW + 601) == []
    assert second.starts() == []


def test_a_failure_not_retried_plans_nothing_and_logs_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second = chances(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert not fail(second, ConfigError("password file /x is missing"))
    assert second.starts() == []
    (record,) = caplog.records
    assert (record.name, record.levelno) == ("agent.service", logging.ERROR)
    assert record.getMessage().startswith("backup of main/hospital failed (attempt 1 of 3)")
    assert "not retried: a configuration error" in record.getMessage()


def test_a_retry_past_the_next_scheduled_run_is_not_planned(tmp_path: Path) -> None:
    second = chances(tmp_path)
    planned = second.after_failure(SOURCE, "hospital", FIRE, 1, UNREACHABLE, "down",
                                   now=NOW, next_scheduled=NOW + 300)
    assert not planned
    assert second.starts() == []


def test_a_scheduled_run_drops_the_pending_retry(tmp_path: Path) -> None:
    second = chances(tmp_path)
    fail(second, UNREACHABLE)
    second.drop("main", "other")
    assert second.starts() == [NOW + 600]
    second.drop("main", "hospital")
    assert second.due(NOW + 10_000) == []


def test_a_clock_stepped_back_keeps_the_retry_wait(tmp_path: Path) -> None:
    second = chances(tmp_path)
    fail(second, UNREACHABLE)
    back = NOW - 3600
    assert second.due(back) == []
    assert second.starts() == [back + 600]
    assert second.due(back + 599) == []
    assert len(second.due(back + 600)) == 1


def test_a_missed_run_is_made_up_at_the_start_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second = chances(tmp_path)
    second.handled("main", "hospital", FIRE - timedelta(days=1))
    with caplog.at_level(logging.WARNING):
        second.catch_up(SOURCE, parse_schedule("daily 02:30"), NOW, NOW + 5)
    assert second.starts() == [NOW + 5]
    ((key, pending),) = second.due(NOW + 5)
    assert key == ("main", "hospital")
    assert (pending.fire, pending.failures) == (FIRE, 0)
    (record,) = caplog.records
    assert record.name == "agent.service"
    assert "scheduled at 2026-11-26T02:30:00+00:00 was missed" in record.getMessage()


def test_a_handled_run_is_not_made_up(tmp_path: Path) -> None:
    second = chances(tmp_path)
    second.handled("main", "hospital", FIRE)
    second.catch_up(SOURCE, parse_schedule("daily 02:30"), NOW, NOW + 5)
    assert second.starts() == []
