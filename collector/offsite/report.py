"""What the off-site copier tells the administrator: `backhaul_offsite_*` metrics, and a
notification when a target keeps failing (and one when it works again).

Labels: ``target`` is a configured `[[offsite]]` name; agent and database go through
the collector's label policy (configured names, else ``_other``), so nothing a client
sends grows the series. The copier calls these from worker threads: the metrics are
thread-safe, and notifications are handed to the event loop's thread.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from collector.offsite.copier import Listener
from collector.offsite.copy import Pending
from collector.report.notify import Event, Notifier

NOTIFY_AFTER = 3  # failures in a row before a target counts as failing, not as a blip
NOTIFY_AGENT = "_offsite"  # the notification key's agent part; the target is its database


class OffsiteReport(Listener):
    """Metrics for every target, notifications through ``notifier`` when given."""

    def __init__(self, registry: CollectorRegistry, targets: list[str],
                 label_pair: Callable[[str, str | None], tuple[str, str]],
                 notifier: Notifier | None = None) -> None:
        self._pair = label_pair
        self._notifier = notifier
        self._loop = asyncio.get_running_loop() if notifier is not None else None
        self._hostname = socket.gethostname()
        self.copies = Counter("backhaul_offsite_copies",
                              "Off-site copy attempts by target and result.",
                              ["target", "result"], registry=registry)
        self.bytes = Counter("backhaul_offsite_bytes",
                             "Encrypted bytes uploaded per target.", ["target"],
                             registry=registry)
        self.pending_count = Gauge("backhaul_offsite_pending_backups",
                                   "Stored backups not yet copied to the target.", ["target"],
                                   registry=registry)
        self.oldest = Gauge("backhaul_offsite_oldest_pending_timestamp_seconds",
                            "When the oldest backup still waiting for this target was stored; "
                            "0 if none waits.", ["target"], registry=registry)
        self.failing = Gauge("backhaul_offsite_failures_in_a_row",
                             "Failed attempts of this target since its last success.",
                             ["target"], registry=registry)
        self.last_success = Gauge("backhaul_offsite_last_success_timestamp_seconds",
                                  "Unix time of the last confirmed copy of this database.",
                                  ["target", "agent", "database"], registry=registry)
        for target in targets:
            for result in ("success", "failure"):
                self.copies.labels(target, result)
            self.bytes.labels(target)
            self.failing.labels(target).set(0)
            self.oldest.labels(target).set(0)

    def copied(self, target: str, item: Pending, size: int) -> None:
        self.copies.labels(target, "success").inc()
        self.bytes.labels(target).inc(size)
        database = item.backup.manifest.get("database")
        agent, db = self._pair(item.agent, database if isinstance(database, str) else None)
        self.last_success.labels(target, agent, db).set(datetime.now(UTC).timestamp())
        self.failing.labels(target).set(0)

    def failed(self, target: str, message: str, failures_in_a_row: int) -> None:
        self.copies.labels(target, "failure").inc()
        self.failing.labels(target).set(failures_in_a_row)
        if failures_in_a_row >= NOTIFY_AFTER:
            self._notify("failure", target, message)

    def recovered(self, target: str) -> None:
        self.failing.labels(target).set(0)
        self._notify("recovery", target, f"off-site copies to {target} work again")

    def pending(self, target: str, count: int, oldest: float | None) -> None:
        self.pending_count.labels(target).set(count)
        self.oldest.labels(target).set(oldest or 0)

    def _notify(self, kind: str, target: str, message: str) -> None:
        if self._notifier is None or self._loop is None:
            return
        event = Event(kind="failure" if kind == "failure" else "recovery",
                      agent=NOTIFY_AGENT, database=target,
                      reason="offsite" if kind == "failure" else "ok",
                      message=f"off-site target {target}: {message}", backup=None,
                      time=datetime.now(UTC), collector=self._hostname)
        self._loop.call_soon_threadsafe(self._notifier.notify, event)
