"""`backhaul-agent run` as a real process: schedules, failures, SIGTERM and SIGHUP.

Schedules here are `every 2s`, which the parser accepts like any other interval, so two
runs take seconds; the collector runs in the test's event loop on loopback.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.agent_ops import (
    ThrottlingProxy,
    backups,
    password_file,
    start_service,
    stop_service,
    wait_service,
)
from tests.integration.harness import (
    Deployment,
    log_text,
    mysql_source,
    run_cli,
    running_collector,
    stored_files,
)
from tests.integration.mariadb_server import MariaDBServer
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bulky(mariadb: MariaDBServer) -> str:
    """A database whose compressed dump takes many seconds through a slow link."""
    from tests.integration.sample_data import generate_bulk

    generate_bulk(mariadb, "bulky", 60 * 1024 * 1024)
    return "bulky"


def with_agent_keys(config: Path, agent_keys: str) -> None:
    """Add keys to the [agent] table of a written agent.toml."""
    head = '[agent]\nname = "db1"\n'
    config.write_text(config.read_text().replace(head, head + agent_keys))


def intervals(collector_log: str) -> list[tuple[str, str]]:
    """(event, backup id) for each upload start and end, in log order."""
    events = []
    for line in collector_log.splitlines():
        match = re.search(r"(receiving|stored|backup) db1/\S+ \[([0-9a-f]+)\]", line)
        if match:
            events.append(("start" if match[1] == "receiving" else "end", match[2]))
    return events


async def test_every_schedule_backs_up_again_and_again_and_survives_failures(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Two runs land for each database; a missing database fails each run without stopping
    the service; with max_concurrent = 1 no two uploads overlap; SIGTERM exits 0."""
    pw = password_file(tmp_path, mariadb.root_password)
    output = tmp_path / "service.out"
    async with running_collector(deployment.collector_toml()) as (_, port):
        source = mysql_source(
            mariadb.port,
            '["tricky", "my-db", "nope"]',
            password_file=pw,
            extra='schedule = "every 2s"\n',
        )
        config = deployment.agent_toml("db1", port, source)
        with_agent_keys(config, "max_concurrent = 1\n")
        service = await start_service(config, output)
        try:
            await wait_for(
                lambda: (
                    len(backups(deployment.store, "db1", "tricky")) >= 2
                    and len(backups(deployment.store, "db1", "my-db")) >= 2
                ),
                "two scheduled backups of each database",
            )
            await wait_for(
                lambda: (
                    log_text(deployment.collector_logs).count("reports failure (dump) for nope")
                    >= 2
                ),
                "two failure reports",
            )
            assert service.returncode is None
        finally:
            code = await stop_service(service)
    assert code == 0, output.read_text()
    assert "Traceback" not in output.read_text()
    events = intervals(log_text(deployment.collector_logs))
    assert events, "no uploads logged"
    for index in range(0, len(events) - 1, 2):
        start, end = events[index], events[index + 1]
        assert (start[0], end[0]) == ("start", "end") and start[1] == end[1], events
    agent_log = log_text(deployment.agent_logs)
    assert "scheduled run of source main" in agent_log
    assert "next run" in agent_log


async def test_sigterm_mid_backup_aborts_it_and_leaves_nothing(
    mariadb: MariaDBServer, bulky: str, deployment: Deployment, tmp_path: Path
) -> None:
    """SIGTERM while a (throttled) backup streams: ABORT reaches the collector, nothing is
    kept, the next run was skipped while the first ran, and the process exits 0 in time."""
    pw = password_file(tmp_path, mariadb.root_password)
    output = tmp_path / "service.out"
    async with (
        running_collector(deployment.collector_toml()) as (_, port),
        ThrottlingProxy(port, rate=1024 * 1024) as proxy,
    ):
        source = mysql_source(
            mariadb.port,
            '["bulky"]',
            password_file=pw,
            extra='schedule = "every 2s"\nrecord_checksums = false\n',
        )
        config = deployment.agent_toml("db1", proxy.port, source)
        service = await start_service(config, output, "--stop-timeout", "20")
        try:
            await wait_for(
                lambda: any(
                    p.stat().st_size > 256 * 1024 for p in deployment.store.rglob(".tmp-*")
                ),
                "the backup to stream",
            )
            await wait_for(
                lambda: (
                    "skipped: the previous one is still running" in log_text(deployment.agent_logs)
                ),
                "the next run to be skipped",
                timeout=10,
            )
            assert backups(deployment.store, "db1", "bulky") == []
            started = time.monotonic()
            service.send_signal(signal.SIGTERM)
            code = await wait_service(service, timeout=30)
            took = time.monotonic() - started
        finally:
            if service.returncode is None:
                service.kill()
                await service.wait()
        await wait_for(
            lambda: "agent aborted" in log_text(deployment.collector_logs),
            "the collector to see the ABORT",
            timeout=15,
        )
    assert code == 0, output.read_text()
    assert took < 25
    assert stored_files(deployment.store) == []
    collector_log = log_text(deployment.collector_logs)
    assert "agent aborted: the agent is stopping" in collector_log
    assert "aborted: the agent is stopping" in log_text(deployment.agent_logs)


async def test_sigterm_with_grace_lets_the_running_backup_finish(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """--grace: a backup streaming when SIGTERM comes is stored, and nothing new starts."""
    pw = password_file(tmp_path, mariadb.root_password)
    output = tmp_path / "service.out"
    async with (
        running_collector(deployment.collector_toml()) as (_, port),
        ThrottlingProxy(port, rate=128 * 1024) as proxy,
    ):
        source = mysql_source(
            mariadb.port, '["tricky"]', password_file=pw, extra='schedule = "every 2s"\n'
        )
        config = deployment.agent_toml("db1", proxy.port, source)
        service = await start_service(config, output, "--grace", "60")
        try:
            await wait_for(
                lambda: any(p.stat().st_size > 0 for p in deployment.store.rglob(".tmp-*")),
                "the backup to stream",
            )
            service.send_signal(signal.SIGTERM)
            code = await wait_service(service, timeout=90)
        finally:
            if service.returncode is None:
                service.kill()
                await service.wait()
    assert code == 0, output.read_text()
    assert len(backups(deployment.store, "db1", "tricky")) == 1
    assert [p for p in stored_files(deployment.store) if p.name.startswith(".tmp-")] == []
    assert "waiting up to 60 s for 1 running backup(s)" in log_text(deployment.agent_logs)


async def test_sighup_keeps_a_broken_config_out_and_takes_a_fixed_one(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """SIGHUP with a bad schedule: an error in the log, the service runs on unchanged.
    SIGHUP with a good one: the new schedule runs."""
    pw = password_file(tmp_path, mariadb.root_password)
    output = tmp_path / "service.out"
    async with running_collector(deployment.collector_toml()) as (_, port):

        def write(schedule: str) -> Path:
            source = mysql_source(
                mariadb.port, '["my-db"]', password_file=pw, extra=f'schedule = "{schedule}"\n'
            )
            return deployment.agent_toml("db1", port, source)

        config = write("0 0 1 1 *")  # next New Year's midnight: nothing runs in this test
        service = await start_service(config, output)
        try:
            await wait_for(
                lambda: "next run" in log_text(deployment.agent_logs), "the service to start"
            )
            write("every 2 weeks")
            service.send_signal(signal.SIGHUP)
            await wait_for(
                lambda: "configuration reload failed" in log_text(deployment.agent_logs),
                "the reload to be refused",
            )
            await asyncio.sleep(2.5)  # had the bad file been taken, a run would be due by now
            assert service.returncode is None
            assert backups(deployment.store, "db1", "my-db") == []
            write("every 2s")
            service.send_signal(signal.SIGHUP)
            await wait_for(
                lambda: backups(deployment.store, "db1", "my-db") != [],
                "a backup on the reloaded schedule",
            )
        finally:
            code = await stop_service(service)
    assert code == 0, output.read_text()
    agent_log = log_text(deployment.agent_logs)
    assert "every 2 weeks" in agent_log
    assert "configuration reloaded from" in agent_log


async def test_run_without_any_schedule_is_a_configuration_error(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """Every source with schedule = "none" (one-shot only): nothing for the service to do."""
    pw = password_file(tmp_path, mariadb.root_password)
    source = mysql_source(mariadb.port, '["x"]', password_file=pw, extra='schedule = "none"\n')
    config = deployment.agent_toml("db1", 1, source)
    run = await run_cli("run", "--config", str(config))
    assert run.returncode == 2
    assert "no source has a schedule" in run.stderr
    assert "Traceback" not in run.stderr


async def test_a_bad_schedule_stops_start_up_naming_the_key(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    pw = password_file(tmp_path, mariadb.root_password)
    source = mysql_source(
        mariadb.port, '["x"]', password_file=pw, extra='schedule = "61 * * * *"\n'
    )
    config = deployment.agent_toml("db1", 1, source)
    run = await run_cli("check-config", "--config", str(config))
    assert run.returncode == 2
    assert "sources[0].schedule" in run.stderr and "outside 0-59" in run.stderr


async def test_a_source_without_schedule_runs_daily_by_default_and_says_so(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The example agent.toml has no schedule: the service starts (it used to exit and be
    restarted by systemd every 5 s) and logs the default with its next run."""
    pw = password_file(tmp_path, mariadb.root_password)
    output = tmp_path / "service.out"
    config = deployment.agent_toml("db1", 1, mysql_source(mariadb.port, '["x"]',
                                                          password_file=pw))
    service = await start_service(config, output)
    try:
        await wait_for(lambda: "next run" in log_text(deployment.agent_logs),
                       "the service to plan its first run")
        assert service.returncode is None
    finally:
        code = await stop_service(service)
    assert code == 0, output.read_text()
    agent_log = log_text(deployment.agent_logs)
    assert ("source main has no schedule: using the default 'daily 01:00' with a random "
            "delay of up to 3600 s") in agent_log
    assert "schedule 'daily 01:00', next run" in agent_log
