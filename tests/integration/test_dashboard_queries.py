"""Every dashboard query and rule expression, run by a real Prometheus against real backups.

The real collector receives real backups from the real ``backhaul-agent`` (one failing on
a wrong password, then two stored), a real ``prometheus`` scrapes it with the shipped
rules, and each query of deploy/grafana/backhaul.json and each ``expr`` of the rules goes
through Prometheus' HTTP API: every one must parse and evaluate, and the panels of the
dashboard's first row must return data for the databases of the test.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_alerting_end_to_end import (
    CANARY,
    RULES,
    STALLED,
    WARD,
    Prometheus,
    agent_toml,
    databases,
    eventually,
    free_port,
    metrics_table,
    password_file,
)

from tests.integration.harness import Deployment, mysql_source, run_agent, running_collector
from tests.integration.mariadb_server import MariaDBServer

pytestmark = pytest.mark.integration
__all__ = ["databases"]  # the module-scoped fixture, shared with the alerting tests

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "backhaul.json"
BOTH = '["ward", "stalled"]'

# What Grafana puts in place of its variables before it sends a query: "All" of the
# agent and database variables is ".*"; the intervals are what a 1 s scrape allows.
VARIABLES = {"$agent": ".*", "$database": ".*", "$__rate_interval": "1m",
             "$__interval": "1s", "$__range": "10m"}


def grafana_expr(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def rows_and_panels(board: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(row title, panel) for every panel, in dashboard order."""
    row, found = "", []
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        else:
            found.append((row, panel))
    return found


def rule_exprs() -> list[str]:
    """Each rule's expr, unfolded from YAML's '>-' block to one line."""
    exprs, lines = [], RULES.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        if match[2] not in (">-", ">", "|"):
            exprs.append(match[2])
            continue
        indent, block = len(match[1]), []
        for following in lines[index + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(part for part in block if part))
    return exprs


async def api_get(prometheus: Prometheus, path: str, **params: str) -> dict[str, Any]:
    """The whole answer, error or not, so that a parse error is reported, not raised."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{prometheus.url}/api/v1/{path}", params=params) as response,
    ):
        answer: dict[str, Any] = await response.json()
        return answer


async def run_query(prometheus: Prometheus, expr: str, instant: bool) -> dict[str, Any]:
    if instant:
        return await api_get(prometheus, "query", query=expr)
    now = time.time()
    return await api_get(prometheus, "query_range", query=expr, start=str(now - 600),
                         end=str(now), step="1")


def databases_in(answer: dict[str, Any]) -> set[str]:
    return {series["metric"].get("database", "") for series in answer["data"]["result"]}


async def test_every_panel_query_and_rule_runs_against_real_backups(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """Each query parses and evaluates; the Fleet row shows both databases of the test."""
    metrics_port = free_port()
    config = deployment.collector_toml(
        extra=metrics_table(metrics_port),
        agent_extra={"db1": (
            f"databases = {BOTH}\n"
            'expected_interval = "1h"\n'
            "[agents.expected_intervals]\n"
            f'{WARD} = "1d"\n'
        )},
    )
    board = json.loads(DASHBOARD.read_text())
    async with (
        Prometheus(tmp_path, metrics_port) as prometheus,
        running_collector(config) as (_, port),
    ):
        wrong = password_file(tmp_path, CANARY)
        failing = agent_toml(deployment, port, mysql_source(databases.port, f'["{WARD}"]',
                                                             password_file=wrong))
        assert (await run_agent(failing)).returncode == 5
        right = password_file(tmp_path, databases.root_password)
        good = agent_toml(deployment, port, mysql_source(databases.port, BOTH,
                                                          password_file=right))
        run = await run_agent(good)
        assert run.returncode == 0, run.stderr

        async def scraped_both() -> bool:
            answer = await api_get(
                prometheus, "query",
                query='backhaul_backup_last_size_bytes{form="uncompressed"}',
            )
            # increase() needs two samples of the failure counter in its window.
            failures = await api_get(
                prometheus, "query",
                query='count_over_time(backhaul_backups_total{result="failure"}[1m]) >= 2',
            )
            return databases_in(answer) == {WARD, STALLED} and databases_in(failures) == {WARD}

        await eventually(scraped_both, "prometheus to scrape the failure and both backups")
        expected = await api_get(prometheus, "query",
                                 query="backhaul_backup_expected_interval_seconds")
        intervals = {s["metric"]["database"]: s["value"][1]
                     for s in expected["data"]["result"]}
        assert intervals == {WARD: "86400", STALLED: "3600"}

        problems: list[str] = []
        for row, panel in rows_and_panels(board):
            for target in panel["targets"]:
                expr = grafana_expr(target["expr"])
                answer = await run_query(prometheus, expr, target.get("instant", False))
                where = f"{row} / {panel['title']} / {target['refId']}"
                if answer["status"] != "success":
                    problems.append(f"{where}: {answer.get('error')}: {expr}")
                elif row == "Fleet" and not answer["data"]["result"]:
                    problems.append(f"{where}: no data: {expr}")
        fleet = await fleet_table_databases(prometheus, board)
        for expr in rule_exprs():
            answer = await api_get(prometheus, "query", query=expr)
            if answer["status"] != "success":
                problems.append(f"rule: {answer.get('error')}: {expr}")
        variables = await variable_values(prometheus)
        rules_health = await rule_health(prometheus)

    assert problems == [], "\n".join(problems)
    for ref, found in fleet.items():
        assert found >= {WARD, STALLED}, (ref, found)
    assert variables == {"agent": {"db1"}, "database": {WARD, STALLED}}
    assert rules_health and set(rules_health.values()) == {"ok"}, rules_health


async def fleet_table_databases(
    prometheus: Prometheus, board: dict[str, Any]
) -> dict[str, set[str]]:
    """The databases each query of the Fleet row's status table returns."""
    (table,) = [p for row, p in rows_and_panels(board) if row == "Fleet" and p["type"] == "table"]
    found = {}
    for target in table["targets"]:
        answer = await run_query(prometheus, grafana_expr(target["expr"]), instant=True)
        found[target["refId"]] = databases_in(answer)
    return found


async def variable_values(prometheus: Prometheus) -> dict[str, set[str]]:
    """What Grafana's label_values() variables would offer, through the series API."""
    board = json.loads(DASHBOARD.read_text())
    values = {}
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable.get("query", ""))
        if not match:
            continue
        answer = await api_get(prometheus, f"label/{match[2]}/values",
                               **{"match[]": grafana_expr(match[1])})
        assert answer["status"] == "success", answer
        values[variable["name"]] = set(answer["data"])
    return values


async def rule_health(prometheus: Prometheus) -> dict[str, str]:
    """Each loaded rule's health once Prometheus has evaluated every group."""

    async def evaluated() -> dict[str, str] | None:
        groups = (await prometheus.api("rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if not rules or any(rule.get("lastEvaluation", "").startswith("0001") for rule in rules):
            return None
        return {f"{rule['name']} {rule['query'][:60]}": rule["health"] for rule in rules}

    health: dict[str, str] = await eventually(evaluated, "every rule to be evaluated")
    return health
