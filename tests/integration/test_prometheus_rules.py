"""The shipped Prometheus rules and examples under promtool, and the live metrics endpoint."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from collector.offsite.report import OffsiteReport
from collector.report.metrics import CollectorMetrics, serve_metrics
from common.errors import ConfigError

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "backhaul-rules.yml"
RULE_TESTS = DEPLOY / "backhaul-rules.test.yml"
LONG_RULE_TESTS = DEPLOY / "backhaul-rules.long.test.yml"  # evaluated hourly: days and weeks
README = DEPLOY.parents[1] / "README.md"
EXPECTED = {"db1": ["hospital", "sp ace", "ünï"], "mongo1": ["patients"]}


def promtool() -> str:
    """The promtool binary; its absence fails the test, it never skips it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: these tests need Prometheus' promtool "
            "(Debian package 'prometheus'); install it rather than skipping the rule tests"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=DEPLOY, capture_output=True, text=True, timeout=300)


def exercise(metrics: CollectorMetrics) -> None:
    """Drive every method so each metric family has samples."""
    metrics.agent_seen("db1")
    metrics.backup_started("db1", "hospital", "b1")
    metrics.backup_started("db1", "unlisted", "b2")
    metrics.backup_finished("db1", "sp ace", "b0", "success", None, 2048, 3.5, 8192)
    metrics.backup_finished("db1", "ünï", "b3", "failure", "integrity", 0, 1.0)
    metrics.report_received("mongo1", None, "db_unreachable")
    metrics.report_received("stranger", "x", 'bad "reason"\n')
    metrics.drill_finished("db1", "sp ace", ok=True)
    metrics.drill_finished("db1", "ünï", ok=False)
    metrics.verify_mismatch("db1", "hospital")
    metrics.notification_sent("webhook")
    metrics.notification_failed("email")


def test_shipped_rules_pass_promtool_check() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("tests", [RULE_TESTS, LONG_RULE_TESTS], ids=lambda p: p.name)
def test_shipped_rule_unit_tests_pass(tests: Path) -> None:
    """Every alert fires and stays quiet where the promtool test files say."""
    result = run(promtool(), "test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_cover_every_alert() -> None:
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))
    tested = {
        name
        for path in (RULE_TESTS, LONG_RULE_TESTS)
        for name in re.findall(r"^\s*alertname: (\w+)$", path.read_text(), re.MULTILINE)
    }
    assert len(alerts) >= 12
    assert alerts == tested


def _anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading: lower case, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_links_its_section_of_the_readme_runbook() -> None:
    rules = RULES.read_text()
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE))
    links = re.findall(r'^\s*runbook_url: "README\.md#([\w-]+)"$', rules, re.MULTILINE)
    assert len(links) == len(re.findall(r"^\s*- alert: ", rules, re.MULTILINE))
    headings = re.findall(r"^#+ (.+)$", README.read_text(), re.MULTILINE)
    anchors = {_anchor(heading) for heading in headings}
    assert {alert.lower() for alert in alerts} == set(links)
    assert set(links) <= anchors, set(links) - anchors


def test_example_prometheus_config_is_valid() -> None:
    result = run(promtool(), "check", "config", str(DEPLOY / "prometheus.example.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_alertmanager_config_is_valid() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool (Debian package prometheus-alertmanager) is not installed")
    result = run(amtool, "check-config", str(DEPLOY / "alertmanager.example.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_metrics_the_collector_exports(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, EXPECTED, tmp_path)
    exercise(metrics)
    OffsiteReport(registry, ["b2"], metrics.label_pair)
    exported = {sample.name for family in registry.collect() for sample in family.samples}
    used = set(re.findall(r"\bbackhaul_[a-z_]+", RULES.read_text()))
    assert used
    assert used <= exported, used - exported


async def test_served_metrics_pass_promtool_check_metrics(tmp_path: Path) -> None:
    """A real scrape over HTTP is valid, lint-clean exposition text."""
    registry = CollectorRegistry()
    exercise(CollectorMetrics(registry, EXPECTED, tmp_path))
    async with await serve_metrics(registry, "127.0.0.1", 0) as server:
        assert server.port != 0
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = await response.read()
    assert b'backhaul_backups_running{agent="db1",database="hospital"} 1.0' in body
    assert "ünï".encode() in body

    check = await asyncio.create_subprocess_exec(
        promtool(), "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(check.communicate(body), timeout=60)
    assert check.returncode == 0, output.decode()
    assert output.strip() == b"", output.decode()


async def test_served_metrics_speak_openmetrics_when_asked(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    CollectorMetrics(registry, EXPECTED, tmp_path)
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with (
        await serve_metrics(registry, "127.0.0.1", 0) as server,
        aiohttp.ClientSession() as http,
        http.get(server.url, headers=accept) as response,
    ):
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = await response.read()
    assert body.endswith(b"# EOF\n")


async def test_served_text_matches_registry(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    CollectorMetrics(registry, EXPECTED, tmp_path, clock=lambda: 1000.0)
    async with (
        await serve_metrics(registry, "127.0.0.1", 0) as server,
        aiohttp.ClientSession() as http,
        http.get(server.url) as response,
    ):
        body = await response.read()
    names = set(re.findall(rb"^# TYPE (\S+)", body, re.MULTILINE))
    assert names == set(re.findall(rb"^# TYPE (\S+)", generate_latest(registry), re.MULTILINE))


async def test_closed_server_releases_its_port(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    CollectorMetrics(registry, EXPECTED, tmp_path)
    server = await serve_metrics(registry, "127.0.0.1", 0)
    port = server.port
    await server.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    again = await serve_metrics(registry, "127.0.0.1", port)
    await again.close()


async def test_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    CollectorMetrics(registry, EXPECTED, tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            await serve_metrics(registry, "127.0.0.1", port)
