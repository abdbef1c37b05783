"""The background copier `serve` runs: one task per target, woken by each stored backup.

It never touches the backup path: a stored backup's outcome only sets an event (see
`OffsiteSink`), and everything slow runs in worker threads. A target that fails is
retried with exponential backoff, forever; backups keep being stored locally meanwhile.
Every copy, retry and failure is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from collector.offsite import state
from collector.offsite.bucket import Bucket
from collector.offsite.config import OffsiteTarget
from collector.offsite.copy import Pending, copy_backup, pending
from collector.report.outcomes import Outcome
from common.errors import BackhaulError

log = logging.getLogger(__name__)
FIRST_BACKOFF = 5.0
MAX_BACKOFF = 900.0
RESCAN = 3600.0  # also look for work with no wake-up, e.g. after a manual restore
STALE_SWEEP = 6 * 3600.0


class Listener:
    """What the copier tells metrics and notifications; every method is optional."""

    def copied(self, target: str, item: Pending, size: int) -> None: ...
    def failed(self, target: str, message: str, failures_in_a_row: int) -> None: ...
    def recovered(self, target: str) -> None: ...
    def pending(self, target: str, count: int, oldest: float | None) -> None: ...


def sync_target(target: OffsiteTarget, root: Path, stop: Callable[[], bool] = lambda: False,
                bucket: Bucket | None = None, listener: Listener | None = None,
                *, sweep: bool = True) -> int:
    """Copy every pending backup to ``target``; returns how many were copied. With
    ``sweep``, first abort its unfinished uploads older than a day (billed, invisible).

    Raises:
        BackhaulError: the first failure (already recorded in the target's state).
    """
    listener = listener or Listener()
    done = 0
    # Pending first: a target that cannot even be reached still shows its lag.
    items = pending(root, target.name)
    _report_pending(listener, target.name, items)
    try:
        bucket = bucket or Bucket(target)
        bucket.check()
        if sweep:
            aborted = bucket.abort_stale_uploads()
            if aborted:
                log.warning("offsite %s: aborted %d stale upload(s)", target.name, aborted)
        done = _copy_all(bucket, root, items, stop, listener)
        _report_pending(listener, target.name, pending(root, target.name))
    except BackhaulError as exc:
        if stop():
            raise  # a shutdown is not the target's failure
        message = str(exc)
        recorded = state.record_error(root, target.name, message)
        log.error("offsite %s: %s (failure %d in a row)", target.name, message,
                  recorded.failures_in_a_row)
        listener.failed(target.name, message, recorded.failures_in_a_row)
        raise
    return done


def _copy_all(bucket: Bucket, root: Path, items: list[Pending], stop: Callable[[], bool],
              listener: Listener) -> int:
    """Copy ``items``, up to the target's ``concurrency`` at once; the first error stops
    new copies, lets running ones end, and is raised."""
    name = bucket.target.name
    failed: list[BaseException] = []

    def one(item: Pending) -> int:
        if stop() or failed:
            return 0
        try:
            facts = copy_backup(bucket, root, item, stop)
        except BaseException as exc:
            failed.append(exc)
            return 0
        listener.copied(name, item, int(facts.get("size") or 0))
        return 1

    with ThreadPoolExecutor(bucket.target.concurrency, thread_name_prefix="offsite") as pool:
        done = sum(pool.map(one, items))
    if failed:
        raise failed[0]
    return done


def _report_pending(listener: Listener, target: str, items: list[Pending]) -> None:
    oldest = None
    for item in items:
        stored_at = item.backup.manifest.get("stored_at")
        with contextlib.suppress(TypeError, ValueError):
            when = datetime.fromisoformat(str(stored_at)).timestamp()
            oldest = when if oldest is None else min(oldest, when)
    listener.pending(target, len(items), oldest)


class Copier:
    """Runs one loop per target until ``close()``."""

    def __init__(self, targets: tuple[OffsiteTarget, ...], root: Path,
                 listener: Listener | None = None) -> None:
        self.targets = targets
        self.root = root
        self.listener = listener or Listener()
        self._stopping = threading.Event()
        self._wakes: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for target in self.targets:
            self._wakes[target.name] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._run(target),
                                                   name=f"offsite-{target.name}"))

    def wake(self) -> None:
        """A backup was stored: look for work now. Safe from any thread."""
        if self._loop is None:
            return
        for event in self._wakes.values():
            self._loop.call_soon_threadsafe(event.set)

    async def close(self, timeout: float = 30.0) -> None:
        """Stop between parts (the running upload is aborted, so copied again later)."""
        self._stopping.set()
        for event in self._wakes.values():
            event.set()
        if self._tasks:
            _done, late = await asyncio.wait(self._tasks, timeout=timeout)
            for task in late:
                task.cancel()

    async def _run(self, target: OffsiteTarget) -> None:
        wake = self._wakes[target.name]
        backoff = FIRST_BACKOFF
        bucket: Bucket | None = None
        last_sweep = 0.0
        failing = False
        while not self._stopping.is_set():
            wake.clear()
            try:
                if bucket is None:
                    bucket = await asyncio.to_thread(Bucket, target)
                sweep = time.monotonic() - last_sweep > STALE_SWEEP
                await asyncio.to_thread(sync_target, target, self.root,
                                        self._stopping.is_set, bucket, self.listener,
                                        sweep=sweep)
                if sweep:
                    last_sweep = time.monotonic()
            except BackhaulError:
                failing = True
                log.info("offsite %s: next attempt in %.0f s", target.name, backoff)
                await self._sleep(wake, backoff, ignore_wake=True)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except Exception:  # a bug here must not end off-site copies for good
                log.exception("offsite %s: unexpected error", target.name)
                await self._sleep(wake, MAX_BACKOFF, ignore_wake=True)
                continue
            if failing:
                failing = False
                log.info("offsite %s: copies work again", target.name)
                self.listener.recovered(target.name)
            backoff = FIRST_BACKOFF
            await self._sleep(wake, RESCAN)

    async def _sleep(self, wake: asyncio.Event, seconds: float,
                     ignore_wake: bool = False) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), left)
            if self._stopping.is_set() or not ignore_wake:
                return
            wake.clear()  # in backoff, a new backup does not cut the wait short


class OffsiteSink:
    """An outcome sink: each stored backup wakes the copier, and that is all it does."""

    def __init__(self, copier: Copier) -> None:
        self.copier = copier

    def started(self, agent: str, database: str, backup_id: str) -> None:
        pass

    def finished(self, outcome: Outcome) -> None:
        if outcome.result == "success" and not outcome.is_report and not outcome.is_drill:
            self.copier.wake()

    def agent_seen(self, agent: str) -> None:
        pass
