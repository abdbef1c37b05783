"""The service's second chances: which failures are tried again and when, and which missed
scheduled run is made up after a start.

Pure: no clock and no I/O. The caller passes the time (wall-clock seconds, or aware
datetimes for schedules) and gets back decisions and the words the log line uses.

Retried (the cause is likely gone in minutes): the collector unreachable or the
connection lost, the collector busy or short of disk, a database server that is down,
restarting or dropped the connection, a dump tool killed or stalled, a transfer that
failed its checksum, the database held by another backup on this host, and any database
error not known to be permanent.

Not retried (the same attempt would fail the same way, or worse): a refused user or
wrong password (a server may lock the account after a few tries), an unknown database,
a missing privilege, an invalid view, a configuration error (password file, settings, a
dump tool not installed), a collector that does not trust this agent or that refuses
the database by policy, a protocol error, and bugs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from agent.db_lock import DatabaseBusyError
from agent.schedule import Schedule
from common.errors import (
    BackhaulError,
    CollectorTrustError,
    ConfigError,
    DumpError,
    IntegrityError,
    ProtocolError,
    RejectCode,
    RejectedError,
    StorageError,
    TransportError,
)

# MySQL/MariaDB server error numbers whose cause a retry cannot remove.
_MYSQL_PERMANENT = {
    1044: "the user has no access to the database",
    1045: "the server refused the user (wrong user or password)",
    1049: "the database does not exist",
    1142: "the user lacks a privilege",
    1143: "the user lacks a privilege",
    1227: "the user lacks a privilege",
    1356: "a view is invalid",
    1698: "the server refused the user (wrong user or password)",
}
# MongoDB server codes: AuthenticationFailed, Unauthorized, UserNotFound.
_MONGO_PERMANENT = {
    18: "the server refused the user (wrong user or password)",
    13: "the user lacks a privilege",
    11: "the server refused the user (unknown user)",
}
# Phrases of the agent's own engine errors (agent.engines) that no retry fixes.
_PERMANENT_PHRASES = (
    ("refused user", "the server refused the user (wrong user or password)"),
    ("authentication as", "the server refused the user (wrong user or password)"),
    ("lacks privileges", "the user lacks a privilege"),
    ("has no access to database", "the user has no access to the database"),
    ("does not exist", "the database does not exist"),
    ("password file", "the password file is missing, unreadable or empty"),
    ("found on path", "the dump tool is not installed"),
    ("needs a replica set", "the server is not a replica set"),
    ("option files cannot carry", "a connection setting is invalid"),
)
# "mysqldump: Got error: 1045: ..." and "ERROR 1049 (42000): ..." in a dump tool's stderr.
_TOOL_ERROR_RE = re.compile(r"\berror:?\s+(\d{4})\b", re.IGNORECASE)
_REJECTS_RETRIED = {
    RejectCode.BUSY, RejectCode.STORAGE, RejectCode.INTERNAL, RejectCode.ABORTED,
    RejectCode.INTEGRITY,
}


@dataclass(frozen=True)
class Verdict:
    """Whether a failure is worth another attempt, and in a few words why (or why not)."""

    retry: bool
    why: str


def classify(exc: BaseException) -> Verdict:
    """Sort one attempt's failure into retried or not (see module doc)."""
    if isinstance(exc, DatabaseBusyError):
        return Verdict(True, "another backup, restore or drill of it runs on this host")
    if isinstance(exc, ConfigError):
        return Verdict(False, "a configuration error")
    if isinstance(exc, CollectorTrustError):
        return Verdict(False, "the collector and this agent do not trust each other's keys")
    if isinstance(exc, TransportError):
        return Verdict(True, "the collector is unreachable or the connection was lost")
    if isinstance(exc, RejectedError):
        if exc.code in _REJECTS_RETRIED:
            return Verdict(True, f"the collector could not take it now ({exc.code})")
        return Verdict(False, f"the collector refuses it ({exc.code})")
    if isinstance(exc, ProtocolError):
        return Verdict(False, "a protocol error, which the same attempt would repeat")
    if isinstance(exc, IntegrityError | StorageError):
        return Verdict(True, "the transfer or the store failed a check")
    if isinstance(exc, DumpError):
        return _classify_dump(exc)
    if isinstance(exc, BackhaulError):
        return Verdict(True, "a failure that may pass")
    return Verdict(False, "an internal error")


def _classify_dump(exc: DumpError) -> Verdict:
    for cause in _chain(exc):
        why = _permanent_code(cause)
        if why is not None:
            return Verdict(False, why)
    for match in _TOOL_ERROR_RE.finditer(exc.stderr):
        why = _MYSQL_PERMANENT.get(int(match[1]))
        if why is not None:
            return Verdict(False, why)
    message = str(exc).lower()
    for phrase, why in _PERMANENT_PHRASES:
        if phrase in message:
            return Verdict(False, why)
    if exc.returncode is not None and exc.returncode < 0:
        return Verdict(True, "the dump tool was killed")
    return Verdict(True, "the database server or its dump failed")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _permanent_code(exc: BaseException) -> str | None:
    """A driver's error number known to be permanent; the type's module says which
    driver, since an OSError's first argument is an errno, not a server code."""
    module = type(exc).__module__
    if module.startswith("pymysql"):
        code = exc.args[0] if exc.args else None
        return _MYSQL_PERMANENT.get(code) if isinstance(code, int) else None
    if module.startswith("pymongo"):
        code = getattr(exc, "code", None)
        return _MONGO_PERMANENT.get(code) if isinstance(code, int) else None
    return None


@dataclass(frozen=True)
class RetryPlan:
    """The next attempt of a failed run: when (``at``, wall-clock seconds), or why none."""

    at: float | None
    why: str
    delay: float = 0.0

    def log_text(self, zone: tzinfo) -> str:
        """"will try again at HH:MM" or "not retried: why", for the failure's log line."""
        if self.at is None:
            return f"not retried: {self.why}"
        when = clock_time(self.at, zone, seconds=self.delay < 60)
        return f"will try again at {when} ({self.why})"


def retry_delay(interval: float, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` failed ones: doubling."""
    return interval * 2.0 ** max(failures - 1, 0)


def plan_retry(
    exc: BaseException,
    *,
    failures: int,
    retry_failed: int,
    interval: float,
    now: float,
    next_scheduled: float | None,
    zone: tzinfo,
) -> RetryPlan:
    """When to try a failed scheduled backup again.

    ``failures`` counts the failed attempts of this scheduled run, the one that just
    failed included. No retry when the failure is not retried, the ``retry_failed``
    further attempts are spent, or the next scheduled run would come first (it does the
    same job).
    """
    verdict = classify(exc)
    if not verdict.retry:
        return RetryPlan(None, verdict.why)
    if retry_failed == 0:
        return RetryPlan(None, "retry_failed = 0")
    if failures > retry_failed:
        return RetryPlan(None, f"all {retry_failed} retries failed")
    at = now + retry_delay(interval, failures)
    if next_scheduled is not None and at >= next_scheduled:
        when = clock_time(next_scheduled, zone, seconds=at - now < 60)
        return RetryPlan(None, f"the next scheduled run at {when} comes first")
    return RetryPlan(at, verdict.why, at - now)


def rebase_after_clock_change(planned_at: float, at: float, now: float) -> tuple[float, float]:
    """A retry planned at ``planned_at`` for ``at``, as (planned_at, at) seen at ``now``.

    A wall clock stepped back (NTP, a manual fix) must not postpone a retry by the size
    of the step: the wait is kept, counted from the new time. A clock stepped forward
    makes it due at once, as it does a scheduled run.
    """
    if now < planned_at:
        return now, now + (at - planned_at)
    return planned_at, at


def missed_run(
    schedule: Schedule,
    last_scheduled: datetime | None,
    last_success: datetime | None,
    now: datetime,
) -> datetime | None:
    """The scheduled run to make up at start, if any: the latest scheduled time after
    ``last_scheduled`` (the last one the service handled) and at or before ``now``,
    when no backup succeeded since. Once, however many were missed.

    None with no record (a fresh install runs nothing at start), when nothing was
    missed, or when the record lies in the future (the clock was stepped back).
    Instants are compared as such: two datetimes of one zone compare by wall time,
    which is wrong around a clock change.
    """
    if last_scheduled is None or last_scheduled.timestamp() >= now.timestamp():
        return None
    zone = now.tzinfo
    assert zone is not None, "missed_run needs an aware datetime"
    first = schedule.next_after(last_scheduled.astimezone(zone))
    if first.timestamp() > now.timestamp():
        return None
    latest = _latest_at_or_before(schedule, first, now)
    if last_success is not None and last_success.timestamp() >= latest.timestamp():
        return None
    return latest


_SPANS = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=8))


def _latest_at_or_before(schedule: Schedule, first: datetime, now: datetime) -> datetime:
    """The last run in [first, now], given that ``first`` is one; walks only the most
    recent stretch that holds a run, so a dense schedule slept through costs little."""
    limit = now.timestamp()
    for span in (*_SPANS, None):
        start = now.timestamp() - span.total_seconds() if span is not None else 0.0
        if start <= first.timestamp():
            candidate = first
        else:
            candidate = schedule.next_after(datetime.fromtimestamp(start, now.tzinfo))
            if candidate.timestamp() > limit:
                continue
        while (following := schedule.next_after(candidate)).timestamp() <= limit:
            candidate = following
        return candidate
    raise AssertionError("unreachable: the last span starts at first")


def clock_time(stamp: float, zone: tzinfo, *, seconds: bool = False) -> str:
    """HH:MM of ``stamp`` in ``zone``; HH:MM:SS for waits under a minute."""
    return datetime.fromtimestamp(stamp, zone).strftime("%H:%M:%S" if seconds else "%H:%M")
