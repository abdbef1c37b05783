"""The Backhaul Grafana dashboard as code; prints the dashboard JSON on standard output.

    python deploy/grafana/build_dashboard.py > deploy/grafana/backhaul.json

Built with the types of ``grafana-foundation-sdk``, so a panel, query or variable that
Grafana's schema does not know fails here rather than in a user's Grafana. The data
source is the ``datasource`` variable (any Prometheus), never a fixed UID, so the JSON
imports as it is. tests/unit/test_grafana_dashboard.py fails when the JSON checked in
differs from what this prints.

The ``Fleet`` row comes first and must show data for every database the collector
expects; the rows below it explain a problem the first row shows. An off-site copy lag
panel waits for the off-site feature, which has no metric yet.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

UID = "backhaul-backups"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'agent=~"$agent", database=~"$database"'
"""Every per-database query carries the dashboard's agent and database filters."""

LAST_SUCCESS = f"backhaul_backup_last_success_timestamp_seconds{{{SELECTOR}}}"
INTERVAL = f"backhaul_backup_expected_interval_seconds{{{SELECTOR}}}"
GRACE = f"clamp({INTERVAL} / 12, 3600, 86400)"  # the grace BackhaulBackupMissing allows
AGE = f"time() - {LAST_SUCCESS}"


def query(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False,
          as_table: bool = False) -> prometheus.Dataquery:
    built = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        built = built.legend_format(legend)
    if as_table:
        built = built.format(PromQueryFormat.TABLE)
    return built.instant() if instant else built.range()


def legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
    )


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def merged_table_transformations() -> list[DataTransformerConfig]:
    """Instant queries side by side: one row per (agent, database), one column per query."""
    return [
        DataTransformerConfig(id_val="merge", options={}),
        DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": {"Time": True, "job": True, "instance": True}},
        ),
    ]


def status_table() -> table.Panel:
    status = (
        f"({AGE} > bool {INTERVAL})"
        f" + ({AGE} > bool {INTERVAL} + {GRACE})"
    )
    mappings = ValueMap(options={
        "0": ValueMappingResult(text="on time", color="green", index=0),
        "1": ValueMappingResult(text="late", color="orange", index=1),
        "2": ValueMappingResult(text="missing", color="red", index=2),
    })
    return (
        table.Panel()
        .show_header(True)
        .title("Databases: last success against each one's own interval")
        .description(
            "Every database the collector expects. Status: on time within its expected "
            "interval, late past it, missing past interval plus grace (when "
            "BackhaulBackupMissing fires). Age is empty for a database never backed up."
        )
        .datasource(DATASOURCE)
        .with_target(query(f"{AGE} and {LAST_SUCCESS} > 0", ref="age", instant=True,
                           as_table=True))
        .with_target(query(INTERVAL, ref="interval", instant=True, as_table=True))
        .with_target(query(status, ref="status", instant=True, as_table=True))
        .with_target(query(f"backhaul_backup_last_attempt_success{{{SELECTOR}}}", ref="result",
                           instant=True, as_table=True))
        .transformations(merged_table_transformations())
        .override_by_name("Value #age", [
            DynamicConfigValue(id_val="displayName", value="Age of last success"),
            DynamicConfigValue(id_val="unit", value="s"),
        ])
        .override_by_name("Value #interval", [
            DynamicConfigValue(id_val="displayName", value="Expected every"),
            DynamicConfigValue(id_val="unit", value="s"),
        ])
        .override_by_name("Value #status", [
            DynamicConfigValue(id_val="displayName", value="Status"),
            DynamicConfigValue(id_val="mappings", value=[mappings.to_json()]),
            DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
        ])
        .override_by_name("Value #result", [
            DynamicConfigValue(id_val="displayName", value="Last attempt"),
            DynamicConfigValue(id_val="mappings", value=[ValueMap(options={
                "0": ValueMappingResult(text="failed", color="red", index=0),
                "1": ValueMappingResult(text="succeeded", color="green", index=1),
            }).to_json()]),
            DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
        ])
        .height(10)
        .span(16)
    )


def failed_now() -> stat.Panel:
    return (
        stat.Panel()
        .graph_mode(BigValueGraphMode.NONE)
        .title("Databases whose last attempt failed")
        .datasource(DATASOURCE)
        .with_target(query(
            f"count(backhaul_backup_last_attempt_success{{{SELECTOR}}} == 0) or vector(0)",
            instant=True,
        ))
        .thresholds(thresholds((None, "green"), (1, "red")))
        .height(10)
        .span(4)
    )


def missing_now() -> stat.Panel:
    return (
        stat.Panel()
        .graph_mode(BigValueGraphMode.NONE)
        .title("Databases late or missing")
        .datasource(DATASOURCE)
        .with_target(query(f"count({AGE} > {INTERVAL}) or vector(0)", instant=True))
        .thresholds(thresholds((None, "green"), (1, "orange")))
        .height(10)
        .span(4)
    )


def failures_by_reason() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Failures by reason")
        .description("Failed attempts per interval, by the one-word reason; the full "
                     "message is in the collector's log.")
        .datasource(DATASOURCE)
        .with_target(query(
            f'sum by (agent, database, reason) (increase(backhaul_backups_total{{result="failure", '
            f"{SELECTOR}}}[$__rate_interval]))",
            "{{agent}}/{{database}}: {{reason}}",
        ))
        .unit("short")
        .height(8)
        .span(24)
    )


def sizes() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Backup size per database")
        .description("The last stored backup: compressed (the file) and uncompressed (the "
                     "dump). BackhaulBackupShrank compares the uncompressed size.")
        .datasource(DATASOURCE)
        .with_target(query(f"backhaul_backup_last_size_bytes{{{SELECTOR}}}",
                           "{{agent}}/{{database}} {{form}}"))
        .unit("bytes")
        .height(8)
        .span(12)
    )


def durations() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Backup duration")
        .datasource(DATASOURCE)
        .with_target(query(f"backhaul_backup_last_success_duration_seconds{{{SELECTOR}}}",
                           "{{agent}}/{{database}}"))
        .unit("s")
        .height(8)
        .span(12)
    )


def throughput() -> timeseries.Panel:
    duration = f"backhaul_backup_last_success_duration_seconds{{{SELECTOR}}}"
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Throughput of the last backup")
        .description("Bytes over the wire (compressed) and dumped (uncompressed) per second "
                     "of the last stored backup.")
        .datasource(DATASOURCE)
        .with_target(query(
            f'backhaul_backup_last_size_bytes{{form="compressed", {SELECTOR}}} '
            f"/ ignoring(form) ({duration} > 0)",
            "{{agent}}/{{database}} sent", ref="sent",
        ))
        .with_target(query(
            f'backhaul_backup_last_size_bytes{{form="uncompressed", {SELECTOR}}} '
            f"/ ignoring(form) ({duration} > 0)",
            "{{agent}}/{{database}} dumped", ref="dumped",
        ))
        .unit("Bps")
        .height(8)
        .span(12)
    )


def running() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Oldest running backup")
        .description("BackhaulBackupStuck fires past 6 hours.")
        .datasource(DATASOURCE)
        .with_target(query(f"backhaul_backup_running_oldest_age_seconds{{{SELECTOR}}}",
                           "{{agent}}/{{database}}"))
        .unit("s")
        .height(8)
        .span(12)
    )


def storage() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Storage used and free, with the 7-day forecast")
        .description("The forecast projects the last 2 days' trend of free space a week "
                     "ahead; below zero, BackhaulStorageFullSoon fires.")
        .datasource(DATASOURCE)
        .with_target(query("backhaul_storage_size_bytes - backhaul_storage_free_bytes",
                           "{{instance}} used", ref="used"))
        .with_target(query("backhaul_storage_free_bytes", "{{instance}} free", ref="free"))
        .with_target(query("predict_linear(backhaul_storage_free_bytes[2d], 7 * 86400)",
                           "{{instance}} free in 7 days (forecast)", ref="forecast"))
        .unit("bytes")
        .height(8)
        .span(16)
    )


def storage_free() -> stat.Panel:
    return (
        stat.Panel()
        .graph_mode(BigValueGraphMode.NONE)
        .title("Storage free")
        .datasource(DATASOURCE)
        .with_target(query("backhaul_storage_free_bytes / backhaul_storage_size_bytes",
                           "{{instance}}", instant=True))
        .unit("percentunit")
        .thresholds(thresholds((None, "red"), (0.1, "orange"), (0.2, "green")))
        .height(8)
        .span(8)
    )


def drills() -> table.Panel:
    return (
        table.Panel()
        .show_header(True)
        .title("Restore drills")
        .description("Last drill result and the age of the last successful drill; empty "
                     "where drills do not run.")
        .datasource(DATASOURCE)
        .with_target(query(f"backhaul_drill_last_attempt_success{{{SELECTOR}}}", ref="result",
                           instant=True, as_table=True))
        .with_target(query(
            f"time() - backhaul_drill_last_success_timestamp_seconds{{{SELECTOR}}} "
            f"and backhaul_drill_last_success_timestamp_seconds{{{SELECTOR}}} > 0",
            ref="age", instant=True, as_table=True,
        ))
        .transformations(merged_table_transformations())
        .override_by_name("Value #result", [
            DynamicConfigValue(id_val="displayName", value="Last drill"),
            DynamicConfigValue(id_val="mappings", value=[ValueMap(options={
                "0": ValueMappingResult(text="failed", color="red", index=0),
                "1": ValueMappingResult(text="restored", color="green", index=1),
            }).to_json()]),
            DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
        ])
        .override_by_name("Value #age", [
            DynamicConfigValue(id_val="displayName", value="Last success"),
            DynamicConfigValue(id_val="unit", value="s"),
        ])
        .height(8)
        .span(8)
    )


def verify_mismatches() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Verify mismatches")
        .description("Stored backups whose bytes no longer match their SHA-256 on "
                     "re-verification (BackhaulVerifyMismatch).")
        .datasource(DATASOURCE)
        .with_target(query(
            f"sum by (agent, database) (increase(backhaul_verify_mismatches_total{{{SELECTOR}}}"
            "[$__rate_interval]))",
            "{{agent}}/{{database}}",
        ))
        .unit("short")
        .height(8)
        .span(8)
    )


def notifications() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .legend(legend())
        .fill_opacity(10)
        .title("Notifications")
        .description("Direct notifications delivered and failed, by channel "
                     "(BackhaulNotificationsFailing).")
        .datasource(DATASOURCE)
        .with_target(query(
            "sum by (channel) (increase(backhaul_notifications_failed_total[$__rate_interval]))",
            "{{channel}} failed", ref="failed",
        ))
        .with_target(query(
            "sum by (channel) (increase(backhaul_notifications_sent_total[$__rate_interval]))",
            "{{channel}} sent", ref="sent",
        ))
        .unit("short")
        .height(8)
        .span(8)
    )


def variables() -> list[Any]:
    datasource = (
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    agent = (
        dashboard.QueryVariable("agent").label("Agent").datasource(DATASOURCE)
        .query("label_values(backhaul_backup_expected_interval_seconds, agent)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
    )
    database = (
        dashboard.QueryVariable("database").label("Database").datasource(DATASOURCE)
        .query('label_values(backhaul_backup_expected_interval_seconds{agent=~"$agent"}, '
               "database)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
    )
    return [datasource, agent, database]


def build() -> dict[str, Any]:
    """The dashboard as the JSON object Grafana imports."""
    board = (
        dashboard.Dashboard("Backhaul backups")
        .uid(UID)
        .description("Backups received by the Backhaul collector: is every database backed "
                     "up on its own schedule, and are the backups whole?")
        .tags(["backhaul", "backups"])
        .editable()
        .time("now-7d", "now")
        .refresh("1m")
        .variables(variables())
        .with_row(dashboard.Row("Fleet"))
        .with_panel(status_table())
        .with_panel(failed_now())
        .with_panel(missing_now())
        .with_panel(failures_by_reason())
        .with_row(dashboard.Row("Sizes, durations and throughput"))
        .with_panel(sizes())
        .with_panel(durations())
        .with_panel(throughput())
        .with_panel(running())
        .with_row(dashboard.Row("Storage"))
        .with_panel(storage())
        .with_panel(storage_free())
        .with_row(dashboard.Row("Drills, verification and notifications"))
        .with_panel(drills())
        .with_panel(verify_mismatches())
        .with_panel(notifications())
    )
    built: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    _number_panels(built)
    return built


def _number_panels(board: dict[str, Any]) -> None:
    """Grafana wants a unique id per panel; the SDK leaves them unset."""
    for number, panel in enumerate(board["panels"], start=1):
        panel["id"] = number


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
