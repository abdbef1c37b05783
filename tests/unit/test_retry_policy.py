"""The service's second chances on a fake clock: which failures are retried, when the next
attempt runs, and which missed run is made up (DST nights, a clock stepped back, a host
asleep for two days)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pymongo.errors
import pymysql
import pytest

from agent.db_lock import DatabaseBusyError
from agent.retry_policy import (
    classify,
    missed_run,
    plan_retry,
    rebase_after_clock_change,
    retry_delay,
)
from agent.schedule import parse_schedule
from common.errors import (
    CollectorTrustError,
    CollectorUnreachableError,
    ConfigError,
    DumpError,
    IntegrityError,
    RejectedError,
    RemoteProtocolError,
)

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold)


def dump_error_from(cause: BaseException, message: str = "dump failed") -> DumpError:
    """A DumpError raised from ``cause``, as the engines translate driver errors."""
    try:
        try:
            raise cause
        except Exception as exc:
            raise DumpError(message) from exc
    except DumpError as error:
        return error


# -- which failures are retried --------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        CollectorUnreachableError("cannot reach collector at 127.0.0.1:2222"),
        RejectedError("busy", "too many connections"),
        RejectedError("storage", "disk full"),
        IntegrityError("sha256 mismatch"),
        DatabaseBusyError("main/hospital is busy"),
        dump_error_from(pymysql.err.OperationalError(2003, "Can't connect to MySQL server")),
        dump_error_from(pymysql.err.OperationalError(2013, "Lost connection during query")),
        dump_error_from(pymysql.err.OperationalError(1053, "Server shutdown in progress")),
        DumpError("mariadb-dump was killed by SIGKILL dumping database 'x'", returncode=-9),
        DumpError("dump stalled: no bytes for 600 s"),
        # errno 13 of an OSError is not MongoDB's code 13 (Unauthorized).
        dump_error_from(PermissionError(13, "Permission denied")),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}",
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert classify(exc).retry


@pytest.mark.parametrize(
    ("exc", "why"),
    [
        (ConfigError("agent.toml: sources[0].user is required"), "configuration"),
        (CollectorTrustError("host key mismatch"), "trust"),
        (RejectedError("not_allowed", "database not allowed"), "refuses"),
        (RemoteProtocolError("bad frame"), "protocol"),
        (
            dump_error_from(pymysql.err.OperationalError(1045, "Access denied for user 'r'")),
            "wrong user or password",
        ),
        (
            dump_error_from(pymysql.err.OperationalError(1049, "Unknown database 'gone'")),
            "does not exist",
        ),
        (
            dump_error_from(pymysql.err.OperationalError(1142, "SELECT command denied")),
            "privilege",
        ),
        (
            DumpError(
                "mariadb-dump exited with status 2 dumping database 'gone'",
                returncode=2,
                stderr="mariadb-dump: Got error: 1049: \"Unknown database 'gone'\" when "
                "selecting the database\n",
            ),
            "does not exist",
        ),
        (
            DumpError("user 'bk' lacks privileges to back up database 'h': needs EVENT"),
            "privilege",
        ),
        (
            dump_error_from(pymongo.errors.OperationFailure("auth failed", code=18)),
            "wrong user or password",
        ),
        (DumpError("source main: password file /x is empty"), "password file"),
        (ValueError("a bug"), "internal"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_permanent_failures_are_not_retried_and_say_why(exc: BaseException, why: str) -> None:
    verdict = classify(exc)
    assert not verdict.retry
    assert why in verdict.why


# -- when the next attempt runs --------------------------------------------------------------


def test_retry_interval_doubles_after_each_failure() -> None:
    assert [retry_delay(600, n) for n in (1, 2, 3)] == [600, 1200, 2400]


def test_retries_stop_after_retry_failed_attempts() -> None:
    now = at("2026-11-26T02:30:00").timestamp()
    transient = CollectorUnreachableError("refused")
    plans = [
        plan_retry(transient, failures=n, retry_failed=2, interval=600, now=now,
                   next_scheduled=None, zone=BERLIN)
        for n in (1, 2, 3)
    ]  # fmt: skip
    assert [p.at for p in plans] == [now + 600, now + 1200, None]
    assert plans[0].log_text(BERLIN).startswith("will try again at 02:40 (")
    assert plans[1].log_text(BERLIN).startswith("will try again at 02:50 (")
    assert plans[2].log_text(BERLIN) == "not retried: all 2 retries failed"


def test_retry_failed_zero_turns_retries_off() -> None:
    plan = plan_retry(CollectorUnreachableError("refused"), failures=1, retry_failed=0,
                      interval=600, now=0.0, next_scheduled=None, zone=UTC)  # fmt: skip
    assert plan.at is None and plan.log_text(UTC) == "not retried: retry_failed = 0"


def test_permanent_failure_log_says_not_retried_and_why() -> None:
    exc = dump_error_from(pymysql.err.OperationalError(1045, "Access denied"))
    plan = plan_retry(exc, failures=1, retry_failed=2, interval=600, now=0.0,
                      next_scheduled=None, zone=UTC)  # fmt: skip
    assert plan.log_text(UTC) == (
        "not retried: the server refused the user (wrong user or password)"
    )


def test_no_retry_when_the_next_scheduled_run_comes_first() -> None:
    now = at("2026-11-26T02:30:00").timestamp()
    plan = plan_retry(CollectorUnreachableError("refused"), failures=1, retry_failed=2,
                      interval=3600, now=now, next_scheduled=now + 1800, zone=BERLIN)  # fmt: skip
    assert plan.at is None
    assert plan.log_text(BERLIN) == "not retried: the next scheduled run at 03:00 comes first"


def test_short_waits_are_logged_to_the_second() -> None:
    now = at("2026-11-26T02:30:00").timestamp()
    plan = plan_retry(CollectorUnreachableError("refused"), failures=1, retry_failed=2,
                      interval=2, now=now, next_scheduled=None, zone=BERLIN)  # fmt: skip
    assert plan.log_text(BERLIN).startswith("will try again at 02:30:02 (")


def test_clock_stepped_back_keeps_the_wait_not_the_wall_time() -> None:
    planned, due = 10_000.0, 10_600.0
    assert rebase_after_clock_change(planned, due, planned - 3600) == (6400.0, 7000.0)


def test_clock_stepped_forward_makes_the_retry_due() -> None:
    planned, due = 10_000.0, 10_600.0
    assert rebase_after_clock_change(planned, due, due + 3600) == (planned, due)


# -- which missed run is made up -------------------------------------------------------------

DAILY = parse_schedule("daily 02:30")


def test_fresh_install_without_a_record_makes_nothing_up() -> None:
    assert missed_run(DAILY, None, None, at("2026-11-26T10:00:00")) is None


def test_nothing_missed_nothing_made_up() -> None:
    assert missed_run(DAILY, at("2026-11-26T02:30:00"), None, at("2026-11-26T10:00:00")) is None


def test_a_night_missed_is_made_up() -> None:
    missed = missed_run(DAILY, at("2026-11-25T02:30:00"), None, at("2026-11-26T10:00:00"))
    assert missed == at("2026-11-26T02:30:00")


def test_host_asleep_two_days_makes_up_once_the_latest_run() -> None:
    last = at("2026-11-24T02:30:00")
    missed = missed_run(DAILY, last, last + timedelta(minutes=2), at("2026-11-26T10:00:00"))
    assert missed == at("2026-11-26T02:30:00")


def test_a_success_since_the_latest_missed_run_makes_nothing_up() -> None:
    last, now = at("2026-11-24T02:30:00"), at("2026-11-26T10:00:00")
    assert missed_run(DAILY, last, at("2026-11-26T08:00:00"), now) is None
    # A success between two missed nights does not cover the later one.
    assert missed_run(DAILY, last, at("2026-11-25T08:00:00"), now) == at("2026-11-26T02:30:00")


def test_clock_stepped_back_behind_the_record_makes_nothing_up() -> None:
    assert missed_run(DAILY, at("2026-11-26T02:30:00"), None, at("2026-11-25T23:00:00")) is None


def test_dense_schedule_asleep_two_days_finds_the_latest_run_quickly() -> None:
    every = parse_schedule("every 2s")
    now = at("2026-11-26T10:00:01")
    started = time.monotonic()
    missed = missed_run(every, now - timedelta(days=2), None, now)
    assert missed == at("2026-11-26T10:00:00")
    assert time.monotonic() - started < 1.0


def test_spring_forward_night_run_that_had_not_happened_yet_is_not_missed() -> None:
    """2026-03-29 in Berlin has no 02:30: the run is at 03:30 by the wall clock."""
    last = at("2026-03-28T02:30:00")
    assert missed_run(DAILY, last, None, at("2026-03-29T03:10:00")) is None
    missed = missed_run(DAILY, last, None, at("2026-03-29T03:45:00"))
    # Compared as instants: datetimes of one zone compare by wall time.
    assert missed is not None and missed.timestamp() == at("2026-03-29T03:30:00").timestamp()


def test_fall_back_night_runs_once_even_if_restarted_in_the_repeated_hour() -> None:
    """2026-10-25 in Berlin has 02:30 twice; the run is the first, and the second
    02:30 is no missed run."""
    first = at("2026-10-25T02:30:00", fold=0)
    second_pass = at("2026-10-25T02:45:00", fold=1)
    assert second_pass.timestamp() - first.timestamp() == 4500
    assert missed_run(DAILY, first, None, second_pass) is None
    missed = missed_run(DAILY, at("2026-10-24T02:30:00"), None, second_pass)
    assert missed is not None and missed.timestamp() == first.timestamp()
