"""The Grafana dashboard: generated, checked in unchanged, valid for Grafana's schema, portable."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
CHECKED_IN = GRAFANA / "backhaul.json"


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(CHECKED_IN.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (panel for panel in board["panels"] if panel["type"] != "row")


def through_sdk_types(data: dict[str, Any]) -> Any:
    """Decode with the SDK's schema types and encode again: what they do not know is lost."""
    register_default_plugins()  # panel options and Prometheus queries decode by their type
    return json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))


def test_checked_in_json_is_what_the_builder_prints() -> None:
    """Rebuild with: python deploy/grafana/build_dashboard.py > deploy/grafana/backhaul.json"""
    assert CHECKED_IN.read_text() == builder().render()


def test_dashboard_survives_the_sdk_schema_types_unchanged(board: dict[str, Any]) -> None:
    assert through_sdk_types(board) == board


def test_schema_check_catches_an_unknown_panel_or_query_key(board: dict[str, Any]) -> None:
    """The round trip above can fail: a misspelt key does not survive it."""
    for spoil in ("panel", "options", "query"):
        spoilt = copy.deepcopy(board)
        panel = next(panels(spoilt))
        if spoil == "panel":
            panel["fieldConfg"] = {}
        elif spoil == "options":
            panel["options"]["showHeadr"] = True
        else:
            panel["targets"][0]["exprr"] = panel["targets"][0].pop("expr")
        assert through_sdk_types(spoilt) != spoilt, spoil


def test_every_query_uses_the_datasource_variable_and_no_fixed_uid(board: dict[str, Any]) -> None:
    """Importable anywhere: no UID of the machine it was made on."""
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', CHECKED_IN.read_text()))
    assert uids == {"${datasource}", board["uid"]}
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()


def test_variables_are_datasource_agent_and_database(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "agent", "database"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("agent", "database"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
        assert variables[name]["allValue"] == ".*"


def test_per_database_panels_filter_on_agent_and_database(board: dict[str, Any]) -> None:
    fleet_wide = ("backhaul_storage_", "backhaul_notifications_")
    for panel in panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            if any(name in expr for name in fleet_wide):
                continue
            assert 'agent=~"$agent"' in expr and 'database=~"$database"' in expr, expr


def test_panels_tile_the_grid_without_overlap(board: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_issue_panels_are_present_with_fleet_row_first(board: dict[str, Any]) -> None:
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows[0] == "Fleet"
    text = json.dumps(board)
    for metric in (
        "backhaul_backup_expected_interval_seconds", "backhaul_backups_total",
        "backhaul_backup_last_size_bytes", "backhaul_backup_last_success_duration_seconds",
        "backhaul_storage_free_bytes", "predict_linear", "backhaul_drill_last_attempt_success",
        "backhaul_verify_mismatches_total", "backhaul_notifications_failed_total",
    ):
        assert metric in text, metric


def test_provisioning_files_point_at_the_dashboard_folder_and_a_prometheus() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "backhaul.yml").read_text()
    assert re.search(r"^apiVersion: 1$", provider, re.MULTILINE)
    assert re.search(r"^\s+type: file$", provider, re.MULTILINE)
    assert re.search(r"^\s+path: /\S+$", provider, re.MULTILINE)
    source = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^apiVersion: 1$", source, re.MULTILINE)
    assert re.search(r"^\s+type: prometheus$", source, re.MULTILINE)
    assert re.search(r"^\s+url: http://\S+$", source, re.MULTILINE)
