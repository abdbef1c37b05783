"""`backhaul-agent run` as a real process, given second chances: failed backups tried
again, a run missed while stopped made up once, and one backup of a database at a time.

A real collector (in the test's event loop, with its metrics endpoint and a webhook
receiver on loopback) and a real MariaDB. Intervals are seconds (`retry_interval = "1s"`)
so that retries take seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.db_lock import DatabaseLock
from agent.run_state import RunState
from tests.integration.agent_ops import (
    ThrottlingProxy,
    backups,
    password_file,
    start_service,
    stop_service,
)
from tests.integration.harness import Deployment, log_text, mysql_source, run_cli, running_collector
from tests.integration.loopback import free_port
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.metrics_scrape import sample, scrape
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


# -- helpers --------------------------------------------------------------------------------


class Webhook:
    """A real webhook receiver on loopback: each POSTed JSON body lands in ``bodies``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Webhook:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.Response(status=204)


class Gate:
    """A port the agent is pointed at, where the collector answers only while open."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    async with Webhook() as hook:
        yield hook


def collector_extra(metrics_port: int, hook: Webhook) -> str:
    return (
        f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'\n[notify]\nwebhooks = ["{hook.url}"]\nretries = 1\nbackoff = 0.1\ntimeout = 10\n'
    )


def agent_config(
    deployment: Deployment, port: int, mariadb: MariaDBServer, folder: Path, databases: str,
    extra: str,
) -> Path:
    """agent.toml for db1 with one MariaDB source; the collector is tried once per attempt
    (no connection retries), so an attempt with the collector away fails at once."""
    pw = password_file(folder, mariadb.root_password)
    config = deployment.agent_toml("db1", port, mysql_source(mariadb.port, databases,
                                                              password_file=pw, extra=extra))
    config.write_text(config.read_text().replace("connect_timeout = 10\n",
                                                 "connect_timeout = 10\nretries = 0\n"))
    return config


def uploads(collector_log: str, database: str) -> list[tuple[str, str]]:
    """(event, backup id) for each upload of ``database`` starting and ending, in order."""
    events = []
    pattern = rf"(receiving|stored|backup) db1/{re.escape(database)} \[([0-9a-f]+)\]"
    for line in collector_log.splitlines():
        if match := re.search(pattern, line):
            events.append(("start" if match[1] == "receiving" else "end", match[2]))
    return events


# -- failed backups are tried again ---------------------------------------------------------


async def test_collector_down_at_the_scheduled_time_the_backup_lands_at_the_retry(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path,
    webhook: Webhook,
) -> None:
    """The collector is away at the scheduled time and back a little later: the backup
    lands at the retry; the failure and then the recovery reach /metrics and the webhook.
    A database that does not exist is not retried once the collector says why."""
    metrics_port = free_port()
    output = tmp_path / "service.out"
    collector = deployment.collector_toml(
        collector_extra(metrics_port, webhook),
        agent_extra={"db1": 'databases = ["tricky", "nope"]\n'},  # the metrics' label set
    )
    async with running_collector(collector) as (_, port):
        gate = Gate(port)
        config = agent_config(
            deployment, gate.port, mariadb, tmp_path, '["tricky", "nope"]',
            'schedule = "every 30s"\nretry_failed = 2\nretry_interval = "3s"\n',
        )
        service = await start_service(config, output)
        try:
            await wait_for(lambda: "main/tricky failed (attempt 1 of 3)"
                           in log_text(deployment.agent_logs),
                           "the first attempt to fail with the collector away", timeout=45)
            first_failure = time.monotonic()
            await gate.open()
            await wait_for(lambda: backups(deployment.store, "db1", "tricky") != [],
                           "the retry to store the backup", timeout=30)
            landed = time.monotonic() - first_failure
            await wait_for(lambda: "not retried: the database does not exist"
                           in log_text(deployment.agent_logs), "nope's failure not retried")
            await wait_for(lambda: any(b["kind"] == "recovery" for b in webhook.bodies),
                           "the recovery notice")
            metrics = await scrape(metrics_port)
        finally:
            code = await stop_service(service)
            await gate.close()
    assert code == 0, output.read_text()
    assert landed < 20  # at the first retry (3 s), not at the next scheduled run (30 s)
    agent_log = log_text(deployment.agent_logs)
    assert re.search(r"backup of main/tricky failed \(attempt 1 of 3\): .*collector.*; "
                     r"will try again at \d\d:\d\d:\d\d \(the collector is unreachable",
                     agent_log), agent_log
    tricky = [b for b in webhook.bodies if b["database"] == "tricky"]
    assert [b["kind"] for b in tricky] == ["failure", "recovery"], webhook.bodies
    assert tricky[0]["reason"] == "transport"
    assert "could not start: cannot reach collector" in tricky[0]["message"]
    pair = {"agent": "db1", "database": "tricky"}
    assert sample(metrics, "backhaul_backups_total", result="failure", reason="transport",
                  **pair) == 1
    assert sample(metrics, "backhaul_backups_total", result="success", **pair) == 1
    assert sample(metrics, "backhaul_backup_last_attempt_success", **pair) == 1
    # nope: the away collector was retried; the unknown database, once known, was not.
    nope = re.findall(r"backup of main/nope failed \(attempt (\d)", agent_log)
    assert nope == ["1", "2"], agent_log
    collector_log = log_text(deployment.collector_logs)
    assert collector_log.count("reports failure (dump) for nope") == 1


async def test_retries_stop_after_retry_failed(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """With the collector away for good, a scheduled run is tried 1 + retry_failed times,
    waits doubling, and the last failure says it is not retried."""
    output = tmp_path / "service.out"
    away = free_port()
    config = agent_config(
        deployment, away, mariadb, tmp_path, '["tricky"]',
        'schedule = "every 30s"\nretry_failed = 2\nretry_interval = "3s"\n',
    )
    service = await start_service(config, output)
    try:
        await wait_for(lambda: "not retried: all 2 retries failed"
                       in log_text(deployment.agent_logs), "the retries to run out", timeout=60)
        await asyncio.sleep(2)
        agent_log = log_text(deployment.agent_logs)
    finally:
        code = await stop_service(service)
    assert code == 0, output.read_text()
    attempts = re.findall(r"backup of main/tricky failed \(attempt (\d) of 3\)", agent_log)
    assert attempts == ["1", "2", "3"], agent_log
    stamps = [datetime.strptime(m, "%Y-%m-%dT%H:%M:%S%z") for m in re.findall(
        r"^(\S+) .*backup of main/tricky not started", agent_log, re.M)]
    assert len(stamps) == 3, agent_log
    # Waits of 3 s then 6 s, plus each attempt's own time (to the second, as logged).
    first, second = ((b - a).total_seconds() for a, b in itertools.pairwise(stamps))
    assert first >= 2 and second >= 5 and second >= first + 1, stamps


async def test_a_database_server_down_is_retried_for_a_source_of_all_databases(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """No MariaDB where the source points: listing the databases fails, is reported to
    the collector, and the whole source is tried again, retry_failed times."""
    output = tmp_path / "service.out"
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = agent_config(deployment, port, mariadb, tmp_path, '"all"',
                              'schedule = "every 30s"\nretry_failed = 1\nretry_interval = "1s"\n')
        down = free_port()
        config.write_text(config.read_text().replace(f"port = {mariadb.port}\n",
                                                     f"port = {down}\n"))
        service = await start_service(config, output)
        try:
            await wait_for(lambda: "not retried: all 1 retries failed"
                           in log_text(deployment.agent_logs), "the retry to fail", timeout=60)
            await wait_for(lambda: log_text(deployment.collector_logs).count(
                "reports failure (dump) for -") == 2, "both failures reported")
        finally:
            code = await stop_service(service)
    assert code == 0, output.read_text()
    agent_log = log_text(deployment.agent_logs)
    assert re.search(r"backup of main/\* failed \(attempt 1 of 2\): cannot connect to MySQL "
                     r"server at 127\.0\.0\.1:\d+: .*; will try again at \d\d:\d\d:\d\d \(the "
                     r"database server or its dump failed\)", agent_log), agent_log
    assert agent_log.count("cannot list databases") == 2


# -- missed runs are made up once -----------------------------------------------------------


async def test_a_run_missed_while_stopped_is_made_up_exactly_once(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Stopped over its scheduled time then started: one catch-up backup. Started again
    with nothing missed: none. A fresh install (no records) makes nothing up."""
    output = tmp_path / "service.out"
    async with running_collector(deployment.collector_toml()) as (_, port):

        def configure(schedule: str) -> Path:
            return agent_config(deployment, port, mariadb, tmp_path, '["my-db"]',
                                f'schedule = "{schedule}"\n')

        # A first run leaves the record of a scheduled run done.
        state = RunState(deployment.agent_state)
        service = await start_service(configure("every 2s"), output)
        try:
            await wait_for(lambda: (r := state.load("main", "my-db")) is not None
                           and r.last_success is not None, "a first scheduled backup")
        finally:
            assert await stop_service(service) == 0, output.read_text()
        assert "nothing to make up" in log_text(deployment.agent_logs)  # fresh install
        record = state.load("main", "my-db")
        assert record is not None and record.last_scheduled is not None
        # While it is stopped, the next minute's run of a daily schedule passes.
        missed = (record.last_scheduled.astimezone() + timedelta(minutes=1)).replace(
            second=0, microsecond=0)
        await asyncio.sleep(max(0.0, missed.timestamp() - time.time() + 1))
        daily = configure(f"{missed.minute} {missed.hour} * * *")
        before = len(backups(deployment.store, "db1", "my-db"))

        service = await start_service(daily, output)
        try:
            await wait_for(lambda: len(backups(deployment.store, "db1", "my-db")) == before + 1,
                           "the catch-up backup")
            await asyncio.sleep(3)
        finally:
            assert await stop_service(service) == 0, output.read_text()
        assert len(backups(deployment.store, "db1", "my-db")) == before + 1
        agent_log = log_text(deployment.agent_logs)
        assert agent_log.count("was missed while the agent was not running") == 1
        assert f"scheduled at {missed.isoformat(timespec='seconds')}" in agent_log

        service = await start_service(daily, output)
        try:
            await wait_for(lambda: log_text(deployment.agent_logs).count("next run") >= 3,
                           "the third start")
            await asyncio.sleep(3)
        finally:
            assert await stop_service(service) == 0, output.read_text()
    assert len(backups(deployment.store, "db1", "my-db")) == before + 1
    assert log_text(deployment.agent_logs).count("was missed while the agent") == 1


async def test_a_damaged_state_file_is_a_warning_and_the_service_runs(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    output = tmp_path / "service.out"
    state = RunState(deployment.agent_state)
    record = state.path("main", "my-db")
    record.parent.mkdir(parents=True)
    record.write_bytes(b'{"version": 1, "source": "main", "datab')  # truncated
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = agent_config(deployment, port, mariadb, tmp_path, '["my-db"]',
                              'schedule = "every 2s"\n')
        service = await start_service(config, output)
        try:
            # The record, not the stored file: the agent writes it once STORED arrives,
            # and a stop between the two would leave the damaged record in place.
            await wait_for(lambda: (r := state.load("main", "my-db")) is not None
                           and r.last_success is not None,
                           "a scheduled backup recorded despite the damaged record")
        finally:
            code = await stop_service(service)
    assert code == 0, output.read_text()
    agent_log = log_text(deployment.agent_logs)
    assert f"the run record {record} is damaged" in agent_log
    assert "starting afresh for main/my-db" in agent_log
    written = json.loads(record.read_text())
    assert written["last_success"] is not None


# -- one backup of a database at a time -----------------------------------------------------


async def test_one_shot_backup_during_the_service_backup_is_refused_or_waits(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """While the service streams a backup of tricky (through a slow link), a one-shot
    backup of tricky is refused naming the service, touching nothing; with --wait it runs
    after the service's backup; never do two uploads of tricky overlap."""
    output = tmp_path / "service.out"
    async with (
        running_collector(deployment.collector_toml()) as (_, port),
        ThrottlingProxy(port, rate=24 * 1024) as proxy,  # ~13 s per backup of tricky
    ):
        config = agent_config(deployment, proxy.port, mariadb, tmp_path, '["tricky"]',
                              'schedule = "every 2s"\n')
        # The one-shot commands share the service's lock folder but not its slow link.
        direct = tmp_path / "agent-direct.toml"
        direct.write_text(config.read_text().replace(f"127.0.0.1:{proxy.port}",
                                                     f"127.0.0.1:{port}"))
        service = await start_service(config, output, "--grace", "120")
        try:
            await wait_for(lambda: any(p.stat().st_size > 0
                                       for p in deployment.store.rglob(".tmp-*")),
                           "the service's backup to stream")
            # Both at once, while the service's backup has seconds to go.
            refusing = asyncio.create_task(
                run_cli("backup", "--config", str(direct), "--source", "main",
                        "--database", "tricky"))
            waiting = asyncio.create_task(
                run_cli("backup", "--config", str(direct), "--source", "main",
                        "--database", "tricky", "--wait", "-v"))
            refused = await refusing
            await wait_for(lambda: "holds its lock; waiting" in log_text(deployment.agent_logs),
                           "the one-shot to wait")
            # The service stops after its running backup (grace), so the next scheduled
            # run cannot take the lock before the waiting one-shot.
            code = await stop_service(service, timeout=120)
            waited = await waiting
        finally:
            await stop_service(service)
    assert code == 0, output.read_text()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(r"main/tricky is busy: pid \d+ \(backhaul-agent run\) since ",
                     refused.stderr), refused.stderr
    assert "Traceback" not in refused.stderr
    assert waited.returncode == 0, waited.stderr
    events = uploads(log_text(deployment.collector_logs), "tricky")
    assert len(events) >= 4, events
    for index in range(0, len(events) - 1, 2):
        start, end = events[index], events[index + 1]
        assert (start[0], end[0]) == ("start", "end") and start[1] == end[1], events
    assert len(backups(deployment.store, "db1", "tricky")) == len(events) // 2


@pytest.mark.parametrize("command", ["restore", "drill"])
async def test_restore_or_drill_of_a_locked_database_is_refused_touching_nothing(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path, command: str
) -> None:
    """A restore into, or a drill of, a database whose lock another process holds (as
    the service does while backing it up) exits 1 naming the holder; the collector,
    never started here, is not even needed to say so."""
    config = agent_config(deployment, free_port(), mariadb, tmp_path, '["hospital"]', "")
    lock = DatabaseLock(deployment.agent_run, "main", "hospital", "backhaul-agent run")
    assert lock.try_acquire() is None
    try:
        run = await run_cli(command, "--config", str(config), "--database", "hospital")
    finally:
        lock.release()
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"main/hospital is busy: pid \d+ \(backhaul-agent run\) since ",
                     run.stderr), run.stderr
    assert "Traceback" not in run.stderr
    assert "cannot reach collector" not in run.stderr + log_text(deployment.agent_logs)
