"""`backhaul-agent run`: the long-running service that backs up each source on its schedule.

* Each source with a ``schedule`` (:mod:`agent.schedule`, in the host's local time zone)
  runs at its times, each run held back by a random 0..``random_delay`` seconds so that
  many hosts do not hit the collector at once. A source without a schedule is left to
  the one-shot ``backhaul-agent backup``.
* Missed runs are made up once (``catch_up``, default on): at start, a database whose
  scheduled time passed while the service was not running, and that has not been backed
  up since, runs once after the random delay (:mod:`agent.second_chances` keeps it, and
  the retries below, until due). A fresh install, with no records, runs nothing.
* A run backs up each database of the source (``"all"`` is discovered at each run), each
  on its own connection to the collector. At most one backup per database runs at a
  time: if the previous one is still going when the next run comes, that database is
  skipped this time, with a warning. At most ``max_concurrent`` backups run at once; the
  others wait their turn.
* A failed backup is logged and reported to the collector exactly as by ``backup``; the
  service goes on. A transient failure is tried again (``retry_failed`` times, after
  ``retry_interval``, doubling; :mod:`agent.retry_policy` says which failures), unless
  the next scheduled run comes first. A failure to reach the collector is reported at
  the next attempt that reaches it, so the failure and then the recovery are seen there.
* Every backup holds its database's lock (:mod:`agent.db_lock`): a one-shot ``backup``,
  ``restore`` or ``drill`` of the database makes the service's attempt wait for a retry.
* SIGTERM or SIGINT: nothing new starts and waiting backups are dropped. Running ones get
  ``grace`` seconds to finish (default 0), then are aborted: ABORT to the collector, which
  keeps nothing, and the dump tool killed. The process exits 0 once all have stopped, or
  1 if any is still stuck after ``stop_timeout`` seconds. A second signal ends the grace.
* SIGHUP: agent.toml is read again. A valid file replaces the configuration for every run
  from then on (sources whose schedule is unchanged keep their next run); an invalid one
  is logged as an error and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.config import DEFAULT_STOP_TIMEOUT, AgentConfig, SourceConfig, load_agent_config
from agent.engines.adapters import adapter_for
from agent.guard import database_guard
from agent.link.abort_on_close import AbortOnCloseClient
from agent.link.requests import send_report
from agent.run_state import RunState
from agent.runner import BackupResult, BackupRunner
from agent.schedule import Schedule, parse_schedule
from agent.second_chances import SecondChances
from common.errors import BackhaulError, ConfigError, ExitCode, TransportError
from common.text import escape_control

log = logging.getLogger(__name__)
MAX_SLEEP = 60.0  # wake at least this often, so a changed wall clock is noticed
SERVICE_COMMAND = "backhaul-agent run"  # as the database locks show the service to others


def local_zone() -> tzinfo:
    """The host's time zone, with its daylight-saving rules when they can be found."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError, OSError):
            return ZoneInfo(name)
    with contextlib.suppress(OSError, ValueError), open("/etc/localtime", "rb") as handle:
        return ZoneInfo.from_file(handle, key="localtime")
    return datetime.now().astimezone().tzinfo or UTC


def check_runnable(config: AgentConfig) -> None:
    """The service needs at least one source with a schedule.

    Raises:
        ConfigError: no source has one.
    """
    if not any(s.schedule for s in config.sources):
        raise ConfigError(
            f'{config.source_file}: no source has a schedule; set schedule = "daily 02:30" '
            "(or every 6h, or a cron expression) on a [[sources]] table"
        )


@dataclass
class _Plan:
    """When a source runs next: its scheduled time, and that plus this run's delay."""

    source: SourceConfig
    schedule: Schedule
    fire: datetime
    start: float

    def same_timing(self, source: SourceConfig) -> bool:
        return (source.schedule, source.random_delay) == (
            self.source.schedule,
            self.source.random_delay,
        )


class _Limiter:
    """A semaphore whose size can change while held (a reload of max_concurrent)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.running < self.limit)
            self.running += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self._cond:
            self.running -= 1
            self._cond.notify_all()

    async def resize(self, limit: int) -> None:
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()


class AgentService:
    """Runs the schedules of one agent.toml until stopped (see module doc)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        grace: float = 0.0,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        load: Callable[[Path], AgentConfig] = load_agent_config,
        on_reload: Callable[[AgentConfig], None] | None = None,
        zone: tzinfo | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        check_runnable(config)
        self.config = config
        self.grace = grace
        self.stop_timeout = stop_timeout
        self._load = load
        self._on_reload = on_reload
        self._zone = zone or local_zone()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - spreading start times, not secrets
        self._limiter = _Limiter(config.max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[asyncio.Task[Any]] = set()
        self._busy: set[tuple[str, str]] = set()
        self._clients: set[AbortOnCloseClient] = set()
        self._wake = asyncio.Event()
        self._force = asyncio.Event()
        self._stopping = False
        self._reload_requested = False
        self._plans: dict[str, _Plan] = self._make_plans(config, {})
        self._chances = SecondChances(RunState(config.state_dir), self._zone)

    def upcoming(self) -> list[tuple[str, datetime, float]]:
        """Each scheduled source's next run: name, scheduled time, start (with its delay)."""
        return [(name, p.fire, p.start) for name, p in sorted(self._plans.items())]

    # -- control, from signal handlers or tests ---------------------------------------------

    def stop(self) -> None:
        """Stop scheduling and wind down; a second call ends the grace period."""
        if self._stopping:
            self._force.set()
            return
        log.info("stop requested: no new backups")
        self._stopping = True
        self._wake.set()

    def reload(self) -> None:
        """Read agent.toml again at the next opportunity."""
        self._reload_requested = True
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> ExitCode:
        """Schedule backups until :meth:`stop`; returns the exit status."""
        handled = self._install_signals()
        self._plan_catch_ups()
        try:
            while not self._stopping:
                self._launch_due()
                await self._sleep()
                if self._reload_requested and not self._stopping:
                    self._reload_requested = False
                    await self._reload()
            # Handlers stay through the shutdown: a second SIGTERM must end the grace
            # (with ABORTs), not kill the process with the default action.
            return await self._shutdown()
        finally:
            loop = asyncio.get_running_loop()
            for signum in handled:
                loop.remove_signal_handler(signum)

    def _install_signals(self) -> list[signal.Signals]:
        loop = asyncio.get_running_loop()
        handled = []
        for signum, handler in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.reload),
        ):
            # Not possible outside the main thread (tests may run the service in-process).
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, handler)
                handled.append(signum)
        return handled

    async def _sleep(self) -> None:
        starts = [p.start for p in self._plans.values()] + self._chances.starts()
        delay = min([MAX_SLEEP, *(s - self._clock() for s in starts)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, delay)):
                await self._wake.wait()
        self._wake.clear()

    def _launch_due(self) -> None:
        now = self._clock()
        for plan in self._plans.values():
            if plan.start <= now:
                self._spawn(self._run_source(self.config, plan.source, plan.fire))
                self._advance(plan, now)
        for (name, database), pending in self._chances.due(now):
            source = self.config.source(name)
            if source is None or source.schedule is None:
                continue  # gone from the configuration since
            if database is None:
                self._spawn(self._run_source(self.config, source, pending.fire, pending.failures))
            else:
                self._start_backup(self.config, source, database, pending.fire, pending.failures)

    def _plan_catch_ups(self) -> None:
        now = self._clock()
        for plan in self._plans.values():
            start = now + self._delay(plan.source)
            self._chances.catch_up(plan.source, plan.schedule, now, start)

    def _advance(self, plan: _Plan, now: float) -> None:
        after = datetime.fromtimestamp(max(now, plan.fire.timestamp()), self._zone)
        plan.fire = plan.schedule.next_after(after)
        plan.start = plan.fire.timestamp() + self._delay(plan.source)

    def _delay(self, source: SourceConfig) -> float:
        return self._rng.uniform(0, source.random_delay) if source.random_delay else 0.0

    def _make_plans(self, config: AgentConfig, old: dict[str, _Plan]) -> dict[str, _Plan]:
        now = datetime.fromtimestamp(self._clock(), self._zone)
        plans: dict[str, _Plan] = {}
        for source in config.sources:
            if source.schedule is None:
                log.info(
                    "source %s has no schedule: only `backhaul-agent backup` backs it up",
                    source.name,
                )
                continue
            previous = old.get(source.name)
            if previous is not None and previous.same_timing(source):
                previous.source = source
                plans[source.name] = previous
                continue
            schedule = parse_schedule(source.schedule)
            fire = schedule.next_after(now)
            plans[source.name] = _Plan(
                source, schedule, fire, fire.timestamp() + self._delay(source)
            )
        for plan in plans.values():
            log.info(
                "source %s: schedule %r, next run %s",
                plan.source.name,
                plan.schedule.text,
                plan.fire.isoformat(timespec="seconds"),
            )
        return plans

    async def _reload(self) -> None:
        path = self.config.source_file
        try:
            config = self._load(path)
            check_runnable(config)
            if self._on_reload is not None:
                self._on_reload(config)
        except ConfigError as exc:
            log.error("configuration reload failed; keeping the running configuration: %s", exc)
            return
        self._plans = self._make_plans(config, self._plans)
        self.config = config
        self._chances.state = RunState(config.state_dir)
        await self._limiter.resize(config.max_concurrent)
        log.info(
            "configuration reloaded from %s: %d source(s), %d scheduled, max_concurrent %d",
            path,
            len(config.sources),
            len(self._plans),
            config.max_concurrent,
        )

    # -- one run of a source ----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_source(
        self, config: AgentConfig, source: SourceConfig, fire: datetime, failures: int = 0
    ) -> None:
        log.info("scheduled run of source %s", source.name)
        self._chances.drop(source.name, None)
        for database in await self._databases(config, source, fire, failures):
            self._chances.drop(source.name, database)  # this run does the retry's job
            self._start_backup(config, source, database, fire, 0)

    def _start_backup(
        self, config: AgentConfig, source: SourceConfig, database: str, fire: datetime,
        failures: int,
    ) -> None:
        key = (source.name, database)
        if key in self._busy:
            log.warning("backup of %s/%s skipped: the previous one is still running",
                        source.name, escape_control(database))
            if failures == 0:
                self._chances.handled(source.name, database, fire)
            return
        self._busy.add(key)
        self._spawn(self._backup(config, source, database, key, fire, failures))

    async def _databases(
        self, config: AgentConfig, source: SourceConfig, fire: datetime, failures: int
    ) -> list[str]:
        if source.databases != "all":
            return list(source.databases)
        try:
            return await adapter_for(source).discover()
        except BackhaulError as exc:
            log.error("source %s: cannot list databases: %s", source.name, exc)
            await self._report(config, source, exc)
            self._after_attempt(source, None, fire, failures + 1, exc, str(exc))
            return []

    async def _backup(
        self, config: AgentConfig, source: SourceConfig, database: str, key: tuple[str, str],
        fire: datetime, failures: int,
    ) -> None:
        label = f"{source.name}/{escape_control(database)}"
        task = asyncio.current_task()
        assert task is not None
        try:
            async with self._limiter:
                self._active.add(task)
                result = await self._backup_now(config, source, database, fire, failures == 0)
            if not result.ok:
                cause = result.cause or BackhaulError(result.error or "unknown error")
                self._after_attempt(source, database, fire, failures + 1, cause,
                                    result.error or "unknown error")
        except asyncio.CancelledError:
            if task in self._active:
                log.warning("backup of %s aborted: the agent is stopping", label)
            raise
        except Exception:  # a bug in one backup must not stop the service
            log.exception("internal error in the backup of %s", label)
        finally:
            self._active.discard(task)
            self._busy.discard(key)

    async def _backup_now(
        self, config: AgentConfig, source: SourceConfig, database: str, fire: datetime,
        first: bool,
    ) -> BackupResult:
        client = AbortOnCloseClient(config)
        try:
            await client.connect()
        except TransportError as exc:
            log.error("backup of %s/%s not started: %s", source.name, escape_control(database), exc)
            self._chances.unreachable(source.name, database, fire, exc)
            if first:
                self._chances.handled(source.name, database, fire)
            return BackupResult(source.name, database, False, error=str(exc),
                                exit_code=exc.exit_code, cause=exc)
        self._clients.add(client)
        try:
            await self._chances.report_unreported(client, source.name, database)
            guard = database_guard(config, SERVICE_COMMAND, scheduled=fire if first else None)
            results = await BackupRunner(config, client, guard=guard).run_source(source, database)
            return results[-1]
        finally:
            self._clients.discard(client)
            await client.close()

    def _after_attempt(
        self, source: SourceConfig, database: str | None, fire: datetime, failures: int,
        cause: BaseException, error: str,
    ) -> None:
        """Log a failed attempt and plan its retry, if any (:mod:`agent.second_chances`);
        a retry planned wakes the loop, whose sleep may now be too long."""
        now = self._clock()
        plan = self._plans.get(source.name)
        next_scheduled = plan.fire.timestamp() if plan is not None else None
        if self._chances.after_failure(source, database, fire, failures, cause, error,
                                       now=now, next_scheduled=next_scheduled):
            self._wake.set()

    async def _report(self, config: AgentConfig, source: SourceConfig, exc: BackhaulError) -> None:
        client = AbortOnCloseClient(config)
        try:
            await client.connect()
            await send_report(
                client,
                kind="failure",
                reason=exc.reason,
                message=str(exc),
                database=None,
                source=source.name,
            )
        except BackhaulError as err:
            log.error("could not report the failure to the collector: %s", err)
        finally:
            await client.close()

    # -- stopping -------------------------------------------------------------------------

    async def _shutdown(self) -> ExitCode:
        for task in self._tasks - self._active:
            task.cancel()  # not started yet: dropped
        if self._active and self.grace > 0:
            log.info(
                "waiting up to %.0f s for %d running backup(s) to finish",
                self.grace,
                len(self._active),
            )
            await self._wait_active(self.grace)
        for client in self._clients:
            client.abort_reason = "the agent is stopping"
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=self.stop_timeout)
            if stuck:
                log.error("%d backup(s) did not stop within %.0f s", len(stuck), self.stop_timeout)
                return ExitCode.FAILED
        log.info("stopped")
        return ExitCode.OK

    async def _wait_active(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._active and not self._force.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            forced = loop.create_task(self._force.wait())
            try:
                await asyncio.wait(
                    {*self._active, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                forced.cancel()
