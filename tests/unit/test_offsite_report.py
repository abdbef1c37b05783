"""Tests for the off-site metrics and notifications (collector.offsite.report)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from collector.offsite.copy import Pending
from collector.offsite.report import NOTIFY_AFTER, OffsiteReport
from collector.report.notify import Event
from collector.store.files import StoredBackup


class RecordingNotifier:
    """Stands in for the Notifier at its own interface: records events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def notify(self, event: Event) -> None:
        self.events.append(event)


def pair(agent: str, database: str | None) -> tuple[str, str]:
    return (agent, database or "_other") if agent == "db1" else ("_other", "_other")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_a_copy_counts_bytes_and_sets_last_success_per_database() -> None:
    registry = CollectorRegistry()
    report = OffsiteReport(registry, ["b2"], pair)
    backup = StoredBackup(Path("/s/db1/hospital/hospital_20261126.sql.zst"),
                          {"database": "hospital"})
    report.copied("b2", Pending("db1/hospital/hospital_20261126.sql.zst", backup), 1234)
    assert value(registry, "backhaul_offsite_copies_total", target="b2", result="success") == 1
    assert value(registry, "backhaul_offsite_bytes_total", target="b2") == 1234
    assert value(registry, "backhaul_offsite_last_success_timestamp_seconds",
                 target="b2", agent="db1", database="hospital")


async def test_series_exist_from_start_so_alerts_can_see_zero() -> None:
    registry = CollectorRegistry()
    OffsiteReport(registry, ["b2"], pair)
    assert value(registry, "backhaul_offsite_copies_total", target="b2", result="failure") == 0
    assert value(registry, "backhaul_offsite_failures_in_a_row", target="b2") == 0


async def test_a_target_that_keeps_failing_notifies_then_its_recovery_too() -> None:
    import asyncio

    notifier = RecordingNotifier()
    registry = CollectorRegistry()
    report = OffsiteReport(registry, ["b2"], pair, notifier)  # type: ignore[arg-type]
    for streak in range(1, NOTIFY_AFTER):
        report.failed("b2", "AccessDenied", streak)
    await asyncio.sleep(0)
    assert notifier.events == []
    report.failed("b2", "AccessDenied", NOTIFY_AFTER)
    report.recovered("b2")
    await asyncio.sleep(0)
    assert [e.kind for e in notifier.events] == ["failure", "recovery"]
    assert notifier.events[0].database == "b2" and "AccessDenied" in notifier.events[0].message
    assert value(registry, "backhaul_offsite_failures_in_a_row", target="b2") == 0
