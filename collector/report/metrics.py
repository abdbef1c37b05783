"""Every Prometheus metric the collector exposes, and the HTTP endpoint that serves them.

All metrics live on a :class:`~prometheus_client.CollectorRegistry` passed in, so tests
make a fresh one and nothing touches the library's global registry.

Label values are bounded by configuration, never by what a client sends
-----------------------------------------------------------------------

Agent and database names arrive from the network. Used as label values as they are, a
misbehaving or compromised agent could create one time series per made-up name and
exhaust Prometheus, or smuggle odd text into alert e-mails. So:

* ``agent`` is a configured agent name, or ``_other`` for any name not configured.
* ``database`` is one of the databases configured for that agent, or ``_other`` for any
  other (including every database of an unknown agent). An agent configured without a
  database list accepts every database: its first :data:`OPEN_AGENT_DATABASES` names
  each get their own series, in the order they arrive, and any further name counts as
  ``_other``. List the databases in ``collector.toml`` to choose them.
* ``reason`` is one word from :data:`REASONS`; anything else counts as ``other``, and a
  success has the reason ``none``. Free text belongs in the log, not in a label.
* ``channel`` is ``webhook``, ``email`` or ``other``; ``result`` is ``success`` or
  ``failure``.

A configured name may not be ``_other`` itself or empty (:class:`ConfigError`), so the
catch-all never hides a real database. The number of series is therefore at most about
(agents + 1) x (databases + 1) per metric, whatever clients do, counting
:data:`OPEN_AGENT_DATABASES` databases for an agent without a list.

What ``_other`` records: the attempt counters, the last attempt's time and result, and
running backups, so a failure of an unlisted database still raises an alert. It records
no "last success" time, size or duration: those describe one database, and a mix of
several would only mislead the missing-backup and shrink rules.

Sizes: ``backhaul_backup_last_size_bytes`` has a ``form`` label, ``compressed`` (the
stored file) and ``uncompressed`` (the dump itself, as the collector counted it while
verifying). The shrink rule reads the uncompressed size, which a change of compression
level or algorithm does not move.

Expectations: for every configured (agent, database) the interval at which a backup is
expected and the shrink factor below which a backup is suspicious, both from
``collector.toml`` (see :mod:`collector.report.expectations`); the rules compare each
database with its own values.

Series that exist from start-up: for every configured (agent, database) the last success
and last attempt timestamps (0 = never), running count and oldest running age (0), the
bit-rot counter, the expected interval and the shrink factor; for every configured agent
its last-seen timestamp (0 = never). The last attempt's result (1 = success, 0 = failure)
appears with the first attempt, because before it neither value would be true. Drill
series appear with the first drill, so a site that does not run drills gets no drill
alerts.

These values are held in memory; the shipped rules use ``max_over_time`` and
``last_over_time`` so that a collector restart does not silence an alert, and
:meth:`CollectorMetrics.seed_last_success` lets start-up restore last-success times from
the stored manifests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from collector.report.expectations import Expectation
from common.errors import ConfigError, RejectCode

__all__ = [
    "CHANNELS",
    "OTHER",
    "REASONS",
    "CollectorMetrics",
    "MetricsServer",
    "reason_label",
    "serve_metrics",
]

logger = logging.getLogger(__name__)

OTHER = "_other"
"""The label value standing for every agent or database name that is not configured."""

OPEN_AGENT_DATABASES = 32
"""Databases with their own series per agent configured without a database list."""

CHANNELS = frozenset({"webhook", "email"})

ERROR_FAMILIES = frozenset(
    {"config", "protocol", "transport", "dump", "storage", "integrity", "rejected"}
)
"""The families of :mod:`common.errors`, usable as a reason."""

REPORT_REASONS = frozenset(
    {"db_unreachable", "auth_failed", "permission_denied", "tool_missing", "timeout", "cancelled"}
)
ABORT_REASONS = frozenset({"stall", "interrupted", "shutdown"})
"""Why an agent gave up mid-dump (the ABORT's code) or the collector stopped a backup."""
"""Why an agent could not even start a dump (sent in a REPORT)."""

REASONS = (
    ERROR_FAMILIES
    | REPORT_REASONS
    | ABORT_REASONS
    | frozenset(code.value for code in RejectCode)
)
"""Every value the ``reason`` label can take on a failure, besides ``other``."""

REASON_NONE = "none"
REASON_OTHER = "other"

Result = Literal["success", "failure"]
SIZE_FORMS = ("compressed", "uncompressed")
Clock = Callable[[], float]


def reason_label(reason: str | None) -> str:
    """Map a failure reason to its label value: a word of :data:`REASONS`, else ``other``.

    Case, surrounding space and ``-``/space versus ``_`` do not matter, so ``"Tool
    missing"`` and ``tool_missing`` count together.
    """
    if reason is None:
        return REASON_OTHER
    word = reason.strip().lower().replace("-", "_").replace(" ", "_")
    return word if word in REASONS else REASON_OTHER


class _LabelPolicy:
    """Maps client-supplied names to label values taken from the configuration."""

    def __init__(self, expected: Mapping[str, Sequence[str] | None]) -> None:
        self.expected: dict[str, tuple[str, ...]] = {}
        self.learned: dict[str, list[str]] = {}  # agents without a list: names seen
        self.update(expected)

    def update(self, expected: Mapping[str, Sequence[str] | None]) -> None:
        """Take up a (re)loaded configuration; names learned so far stay.

        ``None`` as an agent's databases means every database (learned, capped).
        """
        checked: dict[str, tuple[str, ...]] = {}
        for agent, databases in expected.items():
            _check_configured_name(agent, "agent")
            for database in databases or ():
                _check_configured_name(database, f"database of agent {agent!r}")
            checked[agent] = tuple(dict.fromkeys(databases or ()))
        self.expected = checked
        self.open = frozenset(a for a, databases in expected.items() if databases is None)

    def agent(self, agent: str) -> str:
        return agent if agent in self.expected else OTHER

    def pair(self, agent: str, database: str | None) -> tuple[str, str]:
        databases = self.expected.get(agent)
        if databases is None:
            return OTHER, OTHER
        if database in databases:
            return agent, database
        if agent in self.open and database and database != OTHER:
            learned = self.learned.setdefault(agent, [])
            if database in learned:
                return agent, database
            if len(learned) < OPEN_AGENT_DATABASES:
                learned.append(database)
                return agent, database
        return agent, OTHER

    def expected_pairs(self) -> Iterator[tuple[str, str]]:
        for agent, databases in self.expected.items():
            for database in databases:
                yield agent, database

    def catch_all_pairs(self) -> Iterator[tuple[str, str]]:
        for agent in self.expected:
            yield agent, OTHER
        yield OTHER, OTHER


def _check_configured_name(name: str, what: str) -> None:
    if not name:
        raise ConfigError(f"metrics: an empty {what} name cannot be a label value")
    if name == OTHER:
        raise ConfigError(
            f"metrics: the {what} name {OTHER!r} is reserved for names not in the configuration"
        )


@dataclass(frozen=True)
class _Running:
    agent: str
    database: str
    started: float


class _ScrapeTimeCollector:
    """Values computed when Prometheus scrapes: running backups and free storage."""

    def __init__(self, policy: _LabelPolicy, storage_root: Path, clock: Clock) -> None:
        self._policy = policy
        self._storage_root = storage_root
        self._clock = clock
        self._lock = threading.Lock()  # scrapes run in a worker thread
        self._running: dict[str, _Running] = {}
        self._storage_failing = False

    def start(self, backup_id: str, agent: str, database: str) -> None:
        with self._lock:
            self._running[backup_id] = _Running(agent, database, self._clock())

    def finish(self, backup_id: str) -> None:
        with self._lock:
            self._running.pop(backup_id, None)

    def describe(self) -> Iterable[Metric]:
        return [*self._running_families(), *self._storage_families()]

    def collect(self) -> Iterable[Metric]:
        count, oldest = self._running_families()
        now = self._clock()
        totals: dict[tuple[str, str], tuple[int, float]] = dict.fromkeys(
            self._policy.expected_pairs(), (0, 0.0)
        )
        with self._lock:
            running = list(self._running.values())
        for item in running:
            key = (item.agent, item.database)
            n, age = totals.get(key, (0, 0.0))
            totals[key] = (n + 1, max(age, now - item.started, 0.0))
        for (agent, database), (n, age) in totals.items():
            count.add_metric([agent, database], n)
            oldest.add_metric([agent, database], age)
        yield count
        yield oldest
        yield from self._storage_metrics()

    def _running_families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["agent", "database"]
        return (
            GaugeMetricFamily(
                "backhaul_backups_running",
                "Backups being received now.",
                labels=labels,
            ),
            GaugeMetricFamily(
                "backhaul_backup_running_oldest_age_seconds",
                "Age of the oldest backup being received now; 0 when none is running.",
                labels=labels,
            ),
        )

    def _storage_families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "backhaul_storage_free_bytes",
                "Bytes available to the collector on the storage file system.",
            ),
            GaugeMetricFamily(
                "backhaul_storage_size_bytes",
                "Total size of the storage file system in bytes.",
            ),
        )

    def _storage_metrics(self) -> Iterator[Metric]:
        try:
            st = os.statvfs(self._storage_root)
        except OSError as exc:
            if not self._storage_failing:
                logger.warning("cannot read free space of %s: %s", self._storage_root, exc)
            self._storage_failing = True
            return
        self._storage_failing = False
        free, size = self._storage_families()
        free.add_metric([], st.f_bavail * st.f_frsize)
        size.add_metric([], st.f_blocks * st.f_frsize)
        yield free
        yield size


class CollectorMetrics:
    """The collector's metrics, fed by sessions, storage, verifier, drills and notifier.

    Every method accepts untrusted names and maps them as the module docstring says;
    none of them raises on client input.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        expected: Mapping[str, Sequence[str] | None],
        storage_root: Path,
        clock: Clock = time.time,
        *,
        version: str | None = None,
        expectations: Mapping[tuple[str, str], Expectation] | None = None,
    ) -> None:
        """Register all metrics on ``registry`` and create the series expected from start.

        ``expected`` maps each configured agent to the databases it should back up, or
        to None for every database (see the module docstring); ``expectations`` gives an
        (agent, database) its interval and shrink factor, the defaults (daily, 0.5) for
        any pair it does not name.

        Raises:
            ConfigError: a configured name is empty or is the reserved ``_other``.
            ValueError: the registry already holds Backhaul metrics.
        """
        self._policy = _LabelPolicy(expected)
        self._clock = clock
        pair = ["agent", "database"]
        self._last_success = Gauge(
            "backhaul_backup_last_success_timestamp_seconds",
            "Unix time of the last successful backup; 0 if none since the collector started.",
            pair,
            registry=registry,
        )
        self._last_attempt = Gauge(
            "backhaul_backup_last_attempt_timestamp_seconds",
            "Unix time the last backup attempt ended (stored, failed or reported); 0 if none.",
            pair,
            registry=registry,
        )
        self._last_result = Gauge(
            "backhaul_backup_last_attempt_success",
            "1 if the last backup attempt succeeded, 0 if it failed.",
            pair,
            registry=registry,
        )
        self._backups = Counter(
            "backhaul_backups",
            "Backup attempts by result and reason (reason is none on success).",
            [*pair, "result", "reason"],
            registry=registry,
        )
        self._last_size = Gauge(
            "backhaul_backup_last_size_bytes",
            "Size of the last successful backup in bytes: form is compressed (the stored "
            "file) or uncompressed (the dump).",
            [*pair, "form"],
            registry=registry,
        )
        self._expected_interval = Gauge(
            "backhaul_backup_expected_interval_seconds",
            "Interval at which a successful backup is expected, from collector.toml.",
            pair,
            registry=registry,
        )
        self._shrink_factor = Gauge(
            "backhaul_backup_shrink_factor",
            "A backup smaller than this share of the largest of the last 7 days is "
            "suspicious, from collector.toml.",
            pair,
            registry=registry,
        )
        self._last_duration = Gauge(
            "backhaul_backup_last_success_duration_seconds",
            "Duration of the last successful backup in seconds.",
            pair,
            registry=registry,
        )
        self._agent_seen = Gauge(
            "backhaul_agent_last_seen_timestamp_seconds",
            "Unix time an agent last talked to the collector; 0 if not since start.",
            ["agent"],
            registry=registry,
        )
        self._drill_success = Gauge(
            "backhaul_drill_last_success_timestamp_seconds",
            "Unix time of the last successful restore drill; 0 if none.",
            pair,
            registry=registry,
        )
        self._drill_attempt = Gauge(
            "backhaul_drill_last_attempt_timestamp_seconds",
            "Unix time of the last restore drill.",
            pair,
            registry=registry,
        )
        self._drill_result = Gauge(
            "backhaul_drill_last_attempt_success",
            "1 if the last restore drill succeeded, 0 if it failed.",
            pair,
            registry=registry,
        )
        self._verify_mismatches = Counter(
            "backhaul_verify_mismatches",
            "Stored backups whose bytes no longer match their checksum on re-verification.",
            pair,
            registry=registry,
        )
        self._notifications_sent = Counter(
            "backhaul_notifications_sent",
            "Notifications delivered, by channel.",
            ["channel"],
            registry=registry,
        )
        self._notifications_failed = Counter(
            "backhaul_notifications_failed",
            "Notifications that could not be delivered, by channel.",
            ["channel"],
            registry=registry,
        )
        start_time = Gauge(
            "backhaul_collector_start_time_seconds",
            "Unix time the collector started.",
            registry=registry,
        )
        build = Info("backhaul_collector_build", "Collector version.", registry=registry)
        self._scrape_time = _ScrapeTimeCollector(self._policy, storage_root, clock)
        registry.register(self._scrape_time)

        start_time.set(clock())
        build.info({"version": version or _package_version(), "python": platform.python_version()})
        self._create_initial_series(expectations or {})

    def expect(
        self,
        expected: Mapping[str, Sequence[str] | None],
        expectations: Mapping[tuple[str, str], Expectation] | None = None,
    ) -> None:
        """A reloaded configuration: new agents and databases get their series now, and
        every listed database its (perhaps changed) expected interval and shrink factor.

        Series of agents no longer configured stay until the collector restarts.

        Raises:
            ConfigError: a configured name is empty or is the reserved ``_other``.
        """
        agents, pairs = set(self._policy.expected), set(self._policy.expected_pairs())
        self._policy.update(expected)
        self._create_initial_series(expectations or {}, agents, pairs)

    def _create_initial_series(
        self,
        expectations: Mapping[tuple[str, str], Expectation],
        agents: Collection[str] = (),
        pairs: Collection[tuple[str, str]] = (),
    ) -> None:
        """Series of configured names, at 0, except those of ``agents`` and ``pairs``,
        which exist already and keep their values; expectations are set for every pair."""
        for agent in self._policy.expected:
            if agent not in agents:
                self._agent_seen.labels(agent).set(0)
        for agent, database in self._policy.expected_pairs():
            expectation = expectations.get((agent, database), Expectation())
            self._expected_interval.labels(agent, database).set(expectation.interval_s)
            self._shrink_factor.labels(agent, database).set(expectation.shrink_factor)
            if (agent, database) in pairs:
                continue
            self._last_success.labels(agent, database).set(0)
            self._last_attempt.labels(agent, database).set(0)
            self._verify_mismatches.labels(agent, database)
        for agent, database in self._policy.catch_all_pairs():
            self._verify_mismatches.labels(agent, database)
        for channel in sorted(CHANNELS):
            self._notifications_sent.labels(channel)
            self._notifications_failed.labels(channel)

    def backup_started(self, agent: str, database: str, backup_id: str) -> None:
        """A backup's BEGIN was accepted; it counts as running until it finishes."""
        labels = self._policy.pair(agent, database)
        self._scrape_time.start(backup_id, *labels)

    def backup_finished(
        self,
        agent: str,
        database: str,
        backup_id: str,
        result: Result,
        reason: str | None,
        size_bytes: int,
        duration_s: float,
        uncompressed_bytes: int | None = None,
    ) -> None:
        """A backup was stored (``success``) or aborted, rejected or lost (``failure``).

        ``size_bytes`` (stored, compressed), ``uncompressed_bytes`` and ``duration_s`` are
        recorded for a success only.

        Raises:
            ValueError: ``result`` is neither ``"success"`` nor ``"failure"``.
        """
        if result not in ("success", "failure"):
            raise ValueError(f"result must be 'success' or 'failure', not {result!r}")
        self._scrape_time.finish(backup_id)
        labels = self._policy.pair(agent, database)
        now = self._clock()
        if result == "failure":
            self._record_failure(labels, reason, now)
            return
        self._backups.labels(*labels, "success", REASON_NONE).inc()
        self._last_attempt.labels(*labels).set(now)
        self._last_result.labels(*labels).set(1)
        if labels[1] != OTHER:
            self._last_success.labels(*labels).set(now)
            self._set_sizes(labels, size_bytes, uncompressed_bytes)
            self._last_duration.labels(*labels).set(max(duration_s, 0.0))

    def _set_sizes(
        self, labels: tuple[str, str], compressed: int, uncompressed: int | None
    ) -> None:
        self._last_size.labels(*labels, "compressed").set(max(compressed, 0))
        if uncompressed is not None:
            self._last_size.labels(*labels, "uncompressed").set(max(uncompressed, 0))
        else:  # an older size would be compared with a newer backup's
            with contextlib.suppress(KeyError):
                self._last_size.remove(*labels, "uncompressed")

    def report_received(self, agent: str, database: str | None, reason: str) -> None:
        """An agent reported it could not start a dump: a failed attempt.

        Without a database (discovery itself failed) every configured database of the
        agent counts as failed, so each one's alert fires and each clears on its next
        success; an agent with no configured database records it under ``_other``.
        """
        now = self._clock()
        targets = [self._policy.pair(agent, database)]
        if database is None:
            configured = self._policy.expected.get(agent, ())
            targets = [(agent, name) for name in configured] or targets
        for labels in targets:
            self._record_failure(labels, reason, now)

    def _record_failure(self, labels: tuple[str, str], reason: str | None, now: float) -> None:
        self._backups.labels(*labels, "failure", reason_label(reason)).inc()
        self._last_attempt.labels(*labels).set(now)
        self._last_result.labels(*labels).set(0)

    def label_pair(self, agent: str, database: str | None) -> tuple[str, str]:
        """The (agent, database) label values for these names, by the policy above."""
        return self._policy.pair(agent, database)

    def agent_seen(self, agent: str) -> None:
        """An agent connected or sent something; unknown agents count as ``_other``."""
        self._agent_seen.labels(self._policy.agent(agent)).set(self._clock())

    def drill_finished(self, agent: str, database: str, ok: bool) -> None:
        """A restore drill of the latest backup of a database ended."""
        labels = self._policy.pair(agent, database)
        now = self._clock()
        self._drill_attempt.labels(*labels).set(now)
        self._drill_result.labels(*labels).set(1 if ok else 0)
        if labels[1] == OTHER:
            return
        last_success = self._drill_success.labels(*labels)  # appears at 0 if the first fails
        if ok:
            last_success.set(now)

    def verify_mismatch(self, agent: str, database: str) -> None:
        """Re-verification found a stored backup whose bytes changed (bit rot)."""
        self._verify_mismatches.labels(*self._policy.pair(agent, database)).inc()

    def notification_sent(self, channel: str) -> None:
        """A notification reached its ``webhook`` or ``email`` destination."""
        self._notifications_sent.labels(_channel_label(channel)).inc()

    def notification_failed(self, channel: str) -> None:
        """A notification could not be delivered through ``webhook`` or ``email``."""
        self._notifications_failed.labels(_channel_label(channel)).inc()

    def seed_last_success(
        self,
        agent: str,
        database: str,
        timestamp: float,
        size_bytes: int | None = None,
        uncompressed_bytes: int | None = None,
    ) -> None:
        """Restore a configured database's last success from storage at start-up.

        Never moves the time backwards; names that are not configured are ignored.
        """
        labels = self._policy.pair(agent, database)
        if labels[1] == OTHER:
            return
        gauge = self._last_success.labels(*labels)
        if timestamp <= _gauge_value(gauge):
            return
        gauge.set(timestamp)
        if size_bytes is not None:
            self._set_sizes(labels, size_bytes, uncompressed_bytes)


def _channel_label(channel: str) -> str:
    return channel if channel in CHANNELS else REASON_OTHER


def _gauge_value(gauge: Gauge) -> float:
    for metric in gauge.collect():
        for sample in metric.samples:
            return sample.value
    return 0.0


def _package_version() -> str:
    try:
        return metadata.version("backhaul")
    except metadata.PackageNotFoundError:
        return "unknown"


class MetricsServer:
    """A running metrics endpoint; ``close()`` stops it. Usable as ``async with``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        """Stop accepting, finish scrapes in progress and release the port."""
        await self._runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` on the running event loop.

    Port 0 picks a free port; the bound one is ``server.port``. Scrapes are rendered in
    a worker thread, so a slow file system under ``statvfs`` cannot stall the loop.

    Raises:
        ConfigError: the address cannot be bound (in use, not local, not allowed).
    """

    async def handle_metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        body = await asyncio.to_thread(encoder, registry)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"metrics: cannot listen on {host}:{port}: {exc}") from exc
    bound_port = int(runner.addresses[0][1])
    logger.info("serving metrics on %s:%d", host, bound_port)
    return MetricsServer(runner, host, bound_port)
