"""Builds the outcome sinks (metrics, notifications) a collector's configuration asks for."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from collector.config import CollectorConfig
from collector.report.expectations import Expectation
from collector.report.metrics import CollectorMetrics, serve_metrics
from collector.report.notify import Event, Notifier
from collector.report.outcomes import Outcome, OutcomeSink
from collector.store.files import Store
from collector.store.verify_status import VerifyStatusReader

log = logging.getLogger(__name__)
Closer = Callable[[], Awaitable[None]]


class MetricsSink:
    """Feeds every outcome into the Prometheus metrics."""

    def __init__(self, metrics: CollectorMetrics) -> None:
        self.metrics = metrics

    def started(self, agent: str, database: str, backup_id: str) -> None:
        self.metrics.backup_started(agent, database, backup_id)

    def finished(self, outcome: Outcome) -> None:
        if outcome.is_drill:
            assert outcome.database is not None
            self.metrics.drill_finished(outcome.agent, outcome.database,
                                        outcome.result == "success")
            return
        if outcome.is_report:
            self.metrics.report_received(outcome.agent, outcome.database, outcome.reason or "")
            return
        assert outcome.database is not None
        self.metrics.backup_finished(
            outcome.agent, outcome.database, outcome.backup_id,
            "success" if outcome.result == "success" else "failure",
            outcome.reason, outcome.size_bytes, outcome.duration_s, outcome.uncompressed_bytes,
        )

    def agent_seen(self, agent: str) -> None:
        self.metrics.agent_seen(agent)


class NotifySink:
    """Turns outcomes into failure and recovery notifications."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.hostname = socket.gethostname()

    def started(self, agent: str, database: str, backup_id: str) -> None:
        pass

    def finished(self, outcome: Outcome) -> None:
        if outcome.is_drill and outcome.result == "success":
            return  # a passed drill is no news; a failed one is
        self.notifier.notify(Event(
            kind="recovery" if outcome.result == "success" else "failure",
            agent=outcome.agent,
            database=outcome.database or "*",
            reason=outcome.reason or "ok",
            message=outcome.message,
            backup=outcome.name,
            time=datetime.now(UTC),
            collector=self.hostname,
        ))

    def agent_seen(self, agent: str) -> None:
        pass


def seed_from_store(metrics: CollectorMetrics, config: CollectorConfig) -> None:
    """Last-success times survive a restart: read them back from the manifests."""
    store = Store(config.storage.root)
    for agent in config.agents:
        for backup in store.backups(agent.name):
            manifest = backup.manifest
            stored_at = manifest.get("stored_at")
            database = manifest.get("database")
            if not isinstance(stored_at, str) or not isinstance(database, str):
                continue
            try:
                when = datetime.fromisoformat(stored_at).timestamp()
            except ValueError:
                continue
            size = manifest.get("size")
            verification = manifest.get("verification")
            uncompressed = (verification.get("uncompressed_bytes")
                            if isinstance(verification, dict) else None)
            metrics.seed_last_success(agent.name, database, when,
                                      size if isinstance(size, int) else None,
                                      uncompressed if isinstance(uncompressed, int) else None)


def expected_databases(config: CollectorConfig) -> dict[str, tuple[str, ...] | None]:
    """Each configured agent's databases, or None where it may send any."""
    return {a.name: a.databases for a in config.agents}


def expectations_of(config: CollectorConfig) -> dict[tuple[str, str], Expectation]:
    """The expected interval and shrink factor of every listed (agent, database)."""
    return {(a.name, database): a.expectations.for_database(database)
            for a in config.agents for database in a.databases or ()}


async def build_sinks(config: CollectorConfig) -> tuple[list[OutcomeSink], list[Closer]]:
    """The sinks to feed and the coroutines that stop them at shutdown.

    Raises:
        ConfigError: the metrics address cannot be bound.
    """
    sinks: list[OutcomeSink] = []
    closers: list[Closer] = []
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, expected_databases(config), Path(config.storage.root),
                               expectations=expectations_of(config))
    # After CollectorMetrics: a finding shows one scrape later, so Prometheus sees the step.
    registry.register(VerifyStatusReader(Path(config.storage.root), metrics.verify_mismatch))
    await asyncio.to_thread(seed_from_store, metrics, config)
    sinks.append(MetricsSink(metrics))
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        server = await serve_metrics(registry, host, port)
        log.info("metrics on http://%s:%d/metrics", server.host, server.port)
        closers.append(server.close)
    notifier = None
    if config.notify is not None:
        notifier = Notifier(config.notify, metrics.notification_sent, metrics.notification_failed)
        await notifier.start()
        sinks.append(NotifySink(notifier))
        closers.append(notifier.close)
    if config.offsite:
        sinks.append(_offsite_sink(config, registry, metrics, notifier, closers))
    return sinks, closers


def _offsite_sink(config: CollectorConfig, registry: CollectorRegistry,
                  metrics: CollectorMetrics, notifier: Notifier | None,
                  closers: list[Closer]) -> OutcomeSink:
    """Start the off-site copier; its sink wakes it on every stored backup."""
    from collector.offsite.copier import Copier, OffsiteSink
    from collector.offsite.report import OffsiteReport

    report = OffsiteReport(registry, [t.name for t in config.offsite], metrics.label_pair,
                           notifier)
    copier = Copier(config.offsite, Path(config.storage.root), report)
    copier.start()
    # Stop copying before the notifier closes (closers run in order): insert first.
    closers.insert(0, copier.close)
    return OffsiteSink(copier)
