"""The agent service's second chances: the attempts it owes beyond its schedule.

* A failed backup is tried again when :func:`agent.retry_policy.plan_retry` says so.
* A scheduled run missed while the service was not running is made up once at start
  (:func:`agent.catch_up.plan_catch_ups`, on the records of :mod:`agent.run_state`).

Both wait here as a :class:`Pending` attempt until the service's loop takes it when due,
or a scheduled run of the same database does its job first. A failure to reach the
collector is kept too, for the next attempt that reaches it to report, so that the
collector sees the failure and then the recovery.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, tzinfo

from agent.catch_up import plan_catch_ups
from agent.config import SourceConfig
from agent.link.abort_on_close import AbortOnCloseClient
from agent.link.requests import send_report
from agent.retry_policy import clock_time, plan_retry, rebase_after_clock_change
from agent.run_state import RunState
from agent.schedule import Schedule
from common.errors import BackhaulError, TransportError
from common.text import escape_control

# These are the service's log lines: they keep the logger name operators filter on
# (docs/operations-agent.md shows them as agent.service).
log = logging.getLogger("agent.service")

# (source, database), or (source, None) to retry a source whose databases could not be listed.
Key = tuple[str, str | None]


@dataclass
class Pending:
    """A database's next unscheduled attempt: a retry, or a catch-up (no failures yet).

    ``fire`` is the scheduled time the attempt stands for; ``planned_at`` is when it was
    planned, so that a clock stepped back can be noticed.
    """

    fire: datetime
    failures: int
    planned_at: float
    at: float


class SecondChances:
    """The pending retries and catch-ups of one service, and what it owes the collector."""

    def __init__(self, state: RunState, zone: tzinfo) -> None:
        self.state = state
        self._zone = zone
        self._pending: dict[Key, Pending] = {}
        # Failures to reach the collector, reported by the next attempt that reaches it.
        self._unreported: dict[tuple[str, str], str] = {}

    def starts(self) -> list[float]:
        """When each pending attempt is due (wall-clock seconds)."""
        return [p.at for p in self._pending.values()]

    def catch_up(self, source: SourceConfig, schedule: Schedule, now: float, start: float) -> None:
        """Plan, for ``start``, the runs of ``source`` missed while the service was down."""
        for database, missed in plan_catch_ups(self.state, source, schedule,
                                               datetime.fromtimestamp(now, self._zone)):
            log.warning(
                "backup of %s/%s scheduled at %s was missed while the agent was not "
                "running: making it up at %s",
                source.name, escape_control(database),
                missed.isoformat(timespec="seconds"), clock_time(start, self._zone),
            )
            self._pending[(source.name, database)] = Pending(missed, 0, now, start)

    def due(self, now: float) -> list[tuple[Key, Pending]]:
        """Take the attempts due at ``now``; a clock stepped back keeps each one's wait."""
        taken = []
        for key, pending in list(self._pending.items()):
            pending.planned_at, pending.at = rebase_after_clock_change(
                pending.planned_at, pending.at, now
            )
            if pending.at <= now:
                taken.append((key, self._pending.pop(key)))
        return taken

    def drop(self, source: str, database: str | None) -> None:
        """Forget a pending attempt: a scheduled run does its job."""
        self._pending.pop((source, database), None)

    def after_failure(
        self, source: SourceConfig, database: str | None, fire: datetime, failures: int,
        cause: BaseException, error: str, *, now: float, next_scheduled: float | None,
    ) -> bool:
        """Plan the next attempt after a failed one (of a database, or of listing the
        source's databases when ``database`` is None), and say so in its log line.
        True when an attempt was planned."""
        decision = plan_retry(
            cause,
            failures=failures,
            retry_failed=source.retry_failed,
            interval=source.retry_interval,
            now=now,
            next_scheduled=next_scheduled,
            zone=self._zone,
        )
        log.log(
            logging.WARNING if decision.at is not None else logging.ERROR,
            "backup of %s/%s failed (attempt %d of %d): %s; %s",
            source.name, escape_control(database or "*"), failures, source.retry_failed + 1,
            escape_control(error), decision.log_text(self._zone),
        )
        if decision.at is None:
            return False
        self._pending[(source.name, database)] = Pending(fire, failures, now, decision.at)
        return True

    def handled(self, source: str, database: str, fire: datetime) -> None:
        """Note the scheduled run at ``fire`` as dealt with: a restart does not make it up."""
        self.state.record(source, database, scheduled=fire)

    def unreachable(self, source: str, database: str, fire: datetime, exc: TransportError) -> None:
        """Keep a backup that could not reach the collector, for the next one to report."""
        when = clock_time(fire.timestamp(), self._zone, seconds=True)
        message = f"the backup scheduled at {when} could not start: {exc}"
        self._unreported[(source, database)] = message

    async def report_unreported(
        self, client: AbortOnCloseClient, source: str, database: str
    ) -> None:
        """Tell the collector of an earlier attempt that could not reach it."""
        message = self._unreported.pop((source, database), None)
        if message is None:
            return
        try:
            await send_report(client, kind="failure", reason="transport", message=message,
                              database=database, source=source)
        except BackhaulError as exc:
            log.error("could not report an earlier failure of %s/%s to the collector: %s",
                      source, escape_control(database), exc)
