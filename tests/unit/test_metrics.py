"""CollectorMetrics on a fresh registry: initial series, label policy, scrape-time values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from collector.report.expectations import Expectation
from collector.report.metrics import OTHER, CollectorMetrics, reason_label
from common.errors import ConfigError

EXPECTED = {"db1": ["hospital", "sp ace"], "mongo1": ["patients"]}


class FakeClock:
    """A settable clock, so ages and timestamps are exact."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: FakeClock, tmp_path: Path) -> CollectorMetrics:
    return CollectorMetrics(registry, EXPECTED, tmp_path, clock=clock, version="1.2.3")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in registry.collect()
        for sample in family.samples
        if label in sample.labels
    }


def test_expected_series_exist_from_start(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    """Every configured database is visible at 0 before it ever reports."""
    for agent, databases in EXPECTED.items():
        assert value(registry, "backhaul_agent_last_seen_timestamp_seconds", agent=agent) == 0
        for database in databases:
            pair = {"agent": agent, "database": database}
            for name in (
                "backhaul_backup_last_success_timestamp_seconds",
                "backhaul_backup_last_attempt_timestamp_seconds",
                "backhaul_backups_running",
                "backhaul_backup_running_oldest_age_seconds",
                "backhaul_verify_mismatches_total",
            ):
                assert value(registry, name, **pair) == 0, name


def test_last_attempt_result_appears_with_first_attempt(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    """Before any attempt neither 1 nor 0 would be true, so there is no sample."""
    pair = {"agent": "db1", "database": "hospital"}
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) is None
    metrics.backup_finished("db1", "hospital", "b1", "failure", "dump", 0, 1.0)
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 0


def test_success_records_times_size_and_duration(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    pair = {"agent": "db1", "database": "hospital"}
    metrics.backup_started("db1", "hospital", "b1")
    clock.now += 30
    metrics.backup_finished("db1", "hospital", "b1", "success", None, 12345, 29.5, 98765)
    assert value(registry, "backhaul_backup_last_success_timestamp_seconds", **pair) == clock.now
    assert value(registry, "backhaul_backup_last_attempt_timestamp_seconds", **pair) == clock.now
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 1
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="compressed") == 12345
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="uncompressed") == 98765
    assert value(registry, "backhaul_backup_last_success_duration_seconds", **pair) == 29.5
    counted = value(registry, "backhaul_backups_total", **pair, result="success", reason="none")
    assert counted == 1
    assert value(registry, "backhaul_backups_running", **pair) == 0


def test_failure_keeps_last_success_and_counts_reason(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    pair = {"agent": "db1", "database": "hospital"}
    metrics.backup_finished("db1", "hospital", "b1", "success", None, 100, 1.0)
    success_at = clock.now
    clock.now += 86400
    metrics.backup_finished("db1", "hospital", "b2", "failure", "integrity", 50, 1.0)
    assert value(registry, "backhaul_backup_last_success_timestamp_seconds", **pair) == success_at
    assert value(registry, "backhaul_backup_last_attempt_timestamp_seconds", **pair) == clock.now
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 0
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="compressed") == 100
    counted = value(
        registry, "backhaul_backups_total", **pair, result="failure", reason="integrity"
    )
    assert counted == 1


def test_success_without_an_uncompressed_size_drops_the_older_one(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    """An uncompressed size of an older backup must not stand beside a newer backup's."""
    pair = {"agent": "db1", "database": "hospital"}
    metrics.backup_finished("db1", "hospital", "b1", "success", None, 10, 1.0, 100)
    metrics.backup_finished("db1", "hospital", "b2", "success", None, 20, 1.0)
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="compressed") == 20
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="uncompressed") is None


def test_expected_interval_and_shrink_factor_default_to_daily_and_half(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    for agent, databases in EXPECTED.items():
        for database in databases:
            pair = {"agent": agent, "database": database}
            assert value(registry, "backhaul_backup_expected_interval_seconds", **pair) == 86400
            assert value(registry, "backhaul_backup_shrink_factor", **pair) == 0.5


def test_expectations_are_exported_per_database_and_not_for_other(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    weekly = Expectation(interval_s=7 * 86400, shrink_factor=0.2)
    hourly = Expectation(interval_s=3600)
    CollectorMetrics(registry, EXPECTED, tmp_path, expectations={
        ("db1", "hospital"): weekly, ("mongo1", "patients"): hourly, ("db1", "unlisted"): hourly,
    })
    interval = "backhaul_backup_expected_interval_seconds"
    assert value(registry, interval, agent="db1", database="hospital") == 7 * 86400
    assert value(registry, "backhaul_backup_shrink_factor", agent="db1", database="hospital") == 0.2
    assert value(registry, interval, agent="mongo1", database="patients") == 3600
    assert value(registry, interval, agent="db1", database="sp ace") == 86400
    assert value(registry, interval, agent="db1", database="unlisted") is None
    assert value(registry, interval, agent="db1", database=OTHER) is None


def test_backup_finished_rejects_unknown_result(metrics: CollectorMetrics) -> None:
    with pytest.raises(ValueError, match="result"):
        metrics.backup_finished("db1", "hospital", "b1", "maybe", None, 0, 0.0)  # type: ignore[arg-type]


def test_unconfigured_names_never_become_label_values(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    """Client-chosen agent, database and reason text map to fixed values."""
    hostile = 'x"} 1\nbackhaul_fake{a="'
    metrics.backup_started("db1", hostile, "b1")
    metrics.backup_finished("db1", "../../etc", "b2", "failure", hostile, 0, 0.0)
    metrics.backup_finished(hostile, "hospital", "b3", "success", None, 10, 1.0)
    metrics.report_received("db1", "not_listed", "Connection refused by 10.0.0.5")
    metrics.agent_seen(hostile)
    metrics.drill_finished("db1", hostile, ok=False)
    metrics.verify_mismatch(hostile, hostile)
    metrics.notification_failed(hostile)

    assert label_values(registry, "agent") == {"db1", "mongo1", OTHER}
    assert label_values(registry, "database") == {"hospital", "sp ace", "patients", OTHER}
    assert label_values(registry, "reason") <= {"none", "other"}
    assert label_values(registry, "channel") == {"webhook", "email", "other"}
    text = generate_latest(registry).decode()
    assert hostile not in text
    assert "backhaul_fake" not in text
    assert "10.0.0.5" not in text


def test_unlisted_database_fails_under_other_without_success_series(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    """_other carries attempts and results, never a last-success time or size."""
    other = {"agent": "db1", "database": OTHER}
    metrics.backup_finished("db1", "scratch", "b1", "success", None, 10, 1.0)
    assert value(registry, "backhaul_backup_last_attempt_success", **other) == 1
    assert value(registry, "backhaul_backup_last_success_timestamp_seconds", **other) is None
    assert value(registry, "backhaul_backup_last_size_bytes", **other, form="compressed") is None
    metrics.backup_finished("db1", "scratch", "b2", "failure", "dump", 0, 1.0)
    assert value(registry, "backhaul_backup_last_attempt_success", **other) == 0


def test_unknown_agent_maps_to_other_agent_and_database(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    metrics.backup_finished("intruder", "hospital", "b1", "failure", "not_allowed", 0, 0.0)
    both = {"agent": OTHER, "database": OTHER}
    assert value(registry, "backhaul_backup_last_attempt_success", **both) == 0
    hospital = {"agent": "db1", "database": "hospital"}
    assert value(registry, "backhaul_backup_last_attempt_success", **hospital) is None


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("tool_missing", "tool_missing"),
        ("Tool missing", "tool_missing"),
        (" DB-Unreachable ", "db_unreachable"),
        ("too_large", "too_large"),
        ("transport", "transport"),
        ("mysqldump: Got error 1045", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_reason_label_maps_to_fixed_vocabulary(raw: str | None, label: str) -> None:
    assert reason_label(raw) == label


def test_report_counts_as_failed_attempt(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    pair = {"agent": "mongo1", "database": "patients"}
    metrics.report_received("mongo1", "patients", "auth_failed")
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 0
    assert value(registry, "backhaul_backup_last_attempt_timestamp_seconds", **pair) == clock.now
    counted = value(
        registry, "backhaul_backups_total", **pair, result="failure", reason="auth_failed"
    )
    assert counted == 1


def test_report_without_database_fails_every_configured_database(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    metrics.report_received("db1", None, "db_unreachable")
    for database in EXPECTED["db1"]:
        pair = {"agent": "db1", "database": database}
        assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 0
    untouched = {"agent": "mongo1", "database": "patients"}
    assert value(registry, "backhaul_backup_last_attempt_success", **untouched) is None


def test_report_without_database_from_agent_without_list_goes_to_other(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    metrics = CollectorMetrics(registry, {"any": []}, tmp_path)
    metrics.report_received("any", None, "timeout")
    pair = {"agent": "any", "database": OTHER}
    assert value(registry, "backhaul_backup_last_attempt_success", **pair) == 0


def test_running_age_is_computed_at_scrape_time(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    pair = {"agent": "db1", "database": "hospital"}
    metrics.backup_started("db1", "hospital", "old")
    clock.now += 100
    metrics.backup_started("db1", "hospital", "new")
    clock.now += 20
    assert value(registry, "backhaul_backups_running", **pair) == 2
    assert value(registry, "backhaul_backup_running_oldest_age_seconds", **pair) == 120
    clock.now += 3600
    assert value(registry, "backhaul_backup_running_oldest_age_seconds", **pair) == 3720
    metrics.backup_finished("db1", "hospital", "old", "success", None, 1, 1.0)
    assert value(registry, "backhaul_backups_running", **pair) == 1
    assert value(registry, "backhaul_backup_running_oldest_age_seconds", **pair) == 3620
    metrics.backup_finished("db1", "hospital", "new", "failure", "aborted", 0, 1.0)
    assert value(registry, "backhaul_backups_running", **pair) == 0
    assert value(registry, "backhaul_backup_running_oldest_age_seconds", **pair) == 0


def test_storage_free_and_size_come_from_statvfs(
    metrics: CollectorMetrics, registry: CollectorRegistry, tmp_path: Path
) -> None:
    before = os.statvfs(tmp_path)
    free = value(registry, "backhaul_storage_free_bytes")
    size = value(registry, "backhaul_storage_size_bytes")
    after = os.statvfs(tmp_path)
    assert size == before.f_blocks * before.f_frsize
    assert free is not None
    low, high = sorted(s.f_bavail * s.f_frsize for s in (before, after))
    slack = 64 * 1024 * 1024  # other processes write to the same file system
    assert low - slack <= free <= high + slack
    assert 0 < free <= size


def test_unreadable_storage_root_omits_storage_metrics(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A missing root drops the storage series instead of failing the whole scrape."""
    CollectorMetrics(registry, EXPECTED, tmp_path / "missing")
    assert value(registry, "backhaul_storage_free_bytes") is None
    assert value(registry, "backhaul_backups_running", agent="db1", database="hospital") == 0


def test_agent_seen_records_time(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    metrics.agent_seen("mongo1")
    assert value(registry, "backhaul_agent_last_seen_timestamp_seconds", agent="mongo1") == (
        clock.now
    )
    assert value(registry, "backhaul_agent_last_seen_timestamp_seconds", agent="db1") == 0


def test_drill_results(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    pair = {"agent": "db1", "database": "hospital"}
    assert value(registry, "backhaul_drill_last_attempt_success", **pair) is None
    metrics.drill_finished("db1", "hospital", ok=True)
    good_at = clock.now
    clock.now += 7 * 86400
    metrics.drill_finished("db1", "hospital", ok=False)
    assert value(registry, "backhaul_drill_last_success_timestamp_seconds", **pair) == good_at
    assert value(registry, "backhaul_drill_last_attempt_timestamp_seconds", **pair) == clock.now
    assert value(registry, "backhaul_drill_last_attempt_success", **pair) == 0


def test_first_drill_failing_shows_no_success(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    pair = {"agent": "mongo1", "database": "patients"}
    metrics.drill_finished("mongo1", "patients", ok=False)
    assert value(registry, "backhaul_drill_last_success_timestamp_seconds", **pair) == 0


def test_verify_mismatch_counts(metrics: CollectorMetrics, registry: CollectorRegistry) -> None:
    metrics.verify_mismatch("db1", "sp ace")
    metrics.verify_mismatch("db1", "sp ace")
    pair = {"agent": "db1", "database": "sp ace"}
    assert value(registry, "backhaul_verify_mismatches_total", **pair) == 2


def test_notification_counters(metrics: CollectorMetrics, registry: CollectorRegistry) -> None:
    metrics.notification_sent("webhook")
    metrics.notification_failed("email")
    metrics.notification_failed("email")
    assert value(registry, "backhaul_notifications_sent_total", channel="webhook") == 1
    assert value(registry, "backhaul_notifications_sent_total", channel="email") == 0
    assert value(registry, "backhaul_notifications_failed_total", channel="email") == 2


def test_seed_last_success_never_goes_backwards(
    metrics: CollectorMetrics, registry: CollectorRegistry
) -> None:
    pair = {"agent": "db1", "database": "hospital"}
    metrics.seed_last_success("db1", "hospital", 5000.0, size_bytes=42, uncompressed_bytes=420)
    metrics.seed_last_success("db1", "hospital", 4000.0, size_bytes=7, uncompressed_bytes=70)
    metrics.seed_last_success("db1", "unlisted", 6000.0)
    assert value(registry, "backhaul_backup_last_success_timestamp_seconds", **pair) == 5000
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="compressed") == 42
    assert value(registry, "backhaul_backup_last_size_bytes", **pair, form="uncompressed") == 420
    other = {"agent": "db1", "database": OTHER}
    assert value(registry, "backhaul_backup_last_success_timestamp_seconds", **other) is None


def test_build_info_and_start_time(
    metrics: CollectorMetrics, registry: CollectorRegistry, clock: FakeClock
) -> None:
    assert value(registry, "backhaul_collector_start_time_seconds") == clock.now
    info = [
        s
        for family in registry.collect()
        for s in family.samples
        if s.name == "backhaul_collector_build_info"
    ]
    assert len(info) == 1
    assert info[0].labels["version"] == "1.2.3"
    assert info[0].value == 1


@pytest.mark.parametrize("expected", [{OTHER: ["x"]}, {"db1": [OTHER]}, {"": ["x"]}, {"db1": [""]}])
def test_reserved_or_empty_configured_names_are_refused(
    expected: dict[str, list[str]], registry: CollectorRegistry, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="metrics"):
        CollectorMetrics(registry, expected, tmp_path)


def test_fresh_registries_are_independent(tmp_path: Path) -> None:
    """Metrics live on the registry passed in, not on a global one."""
    first, second = CollectorRegistry(), CollectorRegistry()
    CollectorMetrics(first, EXPECTED, tmp_path).agent_seen("db1")
    CollectorMetrics(second, EXPECTED, tmp_path)
    assert value(first, "backhaul_agent_last_seen_timestamp_seconds", agent="db1") != 0
    assert value(second, "backhaul_agent_last_seen_timestamp_seconds", agent="db1") == 0
