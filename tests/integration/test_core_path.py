"""The core path end to end: a real MariaDB, the real agent command, a real collector.

Each backup is restored with the stock `mariadb` client and compared table by table
with CHECKSUM TABLE; each failure must leave no file and say why in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.agent_ops import password_file
from tests.integration.harness import (
    CuttingProxy,
    Deployment,
    LoopbackProxy,
    final_files,
    log_text,
    mysql_source,
    run_agent,
    running_collector,
    ssh_keygen,
    stored_files,
    upload_under_way,
)
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.sample_data import object_counts, table_checksums
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def restore(server: MariaDBServer, backup: Path, into: str) -> None:
    """What the README tells an administrator: zstd -dc file | mariadb db."""
    server.execute(f"DROP DATABASE IF EXISTS `{into}`")
    server.execute(f"CREATE DATABASE `{into}` CHARACTER SET utf8mb4")
    zstd = subprocess.Popen(["zstd", "-dc", str(backup)], stdout=subprocess.PIPE)
    client = subprocess.run(
        ["mariadb", f"--defaults-extra-file={server.defaults_file}", into],
        stdin=zstd.stdout,
        capture_output=True,
        check=False,
    )
    assert zstd.wait() == 0
    assert client.returncode == 0, client.stderr.decode()


def no_traceback(text: str) -> None:
    assert "Traceback" not in text


async def test_all_databases_round_trip_through_stock_restore(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Every database is stored as <db>_<yyyymmdd>.sql.zst and restores identically."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '"all"', password_file=pw)
        )
        run = await run_agent(config)
    assert run.returncode == 0, run.stderr
    no_traceback(run.stderr)
    for database in samples:
        folder = deployment.store / "db1" / database
        backups = sorted(folder.glob("*.sql.zst"))
        assert len(backups) == 1, list(folder.iterdir())
        backup = backups[0]
        assert backup.name.startswith(f"{database}_") and len(backup.name) == len(database) + 17
        assert oct(backup.stat().st_mode & 0o777) == "0o440"
        manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
        assert manifest["database"] == database and manifest["agent"] == "db1"
        assert manifest["verified"] is True and manifest["engine"] == "mysql"
        assert manifest["size"] == backup.stat().st_size
        assert manifest["dump"]["server_version"].startswith("10.")
        assert "binlog" in manifest["dump"]
        restored = f"restored_{database.replace('-', '_')}"
        restore(mariadb, backup, restored)
        assert table_checksums(mariadb, restored) == table_checksums(mariadb, database)
        assert object_counts(mariadb, restored) == object_counts(mariadb, database)
    tricky = json.loads(next((deployment.store / "db1" / "my-db").glob("*.json")).read_text())
    assert tricky["dump"]["non_innodb_tables"] == ["legacy_log"]
    assert tricky["dump"]["consistent_snapshot"] is False


async def test_second_backup_on_the_same_day_gets_a_suffix_and_keeps_the_first(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A same-day repeat is stored as -2 and never replaces the first backup."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        first = await run_agent(config)
        assert first.returncode == 0, first.stderr
        (original,) = (deployment.store / "db1" / "tricky").glob("*.sql.zst")
        before = original.read_bytes()
        mariadb.execute("INSERT INTO tricky.customers (name, created) VALUES ('new', NOW())")
        second = await run_agent(config)
        assert second.returncode == 0, second.stderr
    names = {p.name for p in (deployment.store / "db1" / "tricky").glob("*.sql.zst")}
    assert names == {original.name, original.name.replace(".sql.zst", "-2.sql.zst")}
    assert original.read_bytes() == before


async def test_wrong_password_stops_the_backup_and_reaches_the_collector(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Bad credentials: exit 5, one clear line, no file, a REPORT logged on the collector."""
    canary = "Wr0ng-canary-Passw0rd"
    pw = password_file(tmp_path, canary)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        run = await run_agent(config)
    assert run.returncode == 5
    no_traceback(run.stderr)
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "main/tricky" in failed[0] and "denied" in failed[0].lower()
    assert final_files(deployment.store) == []
    assert "reports failure (dump) for tricky" in log_text(deployment.collector_logs)
    assert "tricky" in log_text(deployment.agent_logs)
    for text in (
        run.stdout,
        run.stderr,
        log_text(deployment.collector_logs),
        log_text(deployment.agent_logs),
    ):
        assert canary not in text


async def test_unknown_database_fails_alone_and_the_others_are_stored(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """One missing database fails; the run still stores the rest and reports each."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["nope", "tricky"]', password_file=pw)
        )
        run = await run_agent(config)
    assert run.returncode == 5
    assert "ok      main/tricky" in run.stdout
    assert "FAILED  main/nope" in run.stderr
    assert "1 stored, 1 failed" in run.stderr
    assert [p.parent.name for p in final_files(deployment.store)] == ["tricky", "tricky"]


async def test_wrong_collector_host_key_is_refused(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """An agent pinned to another host key refuses to talk and sends nothing."""
    pw = password_file(tmp_path, mariadb.root_password)
    impostor = ssh_keygen(tmp_path / "impostor")
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1",
            port,
            mysql_source(mariadb.port, '["tricky"]', password_file=pw),
            host_key=impostor.with_suffix(".pub"),
        )
        run = await run_agent(config)
    assert run.returncode == 4
    assert "does not match the pinned" in run.stderr
    no_traceback(run.stderr)
    assert final_files(deployment.store) == []


async def test_unknown_agent_key_is_refused(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A key the collector does not list cannot log in, even under a listed name."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        deployment.agents["db1"] = ssh_keygen(tmp_path / "stranger")
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        run = await run_agent(config)
    assert run.returncode == 4
    assert "refused this agent's key" in run.stderr
    assert final_files(deployment.store) == []
    assert "refused login as agent db1" in log_text(deployment.collector_logs)


@pytest.fixture(scope="module")
def bulky(mariadb: MariaDBServer) -> str:
    """A database whose compressed dump is several MiB, for mid-stream failures."""
    from tests.integration.sample_data import generate_bulk

    generate_bulk(mariadb, "bulky", 60 * 1024 * 1024)
    return "bulky"


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the collector's store: the disk fills mid-backup."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_full_disk_on_the_collector_rejects_and_leaves_nothing(
    mariadb: MariaDBServer,
    bulky: str,
    deployment: Deployment,
    tmp_path: Path,
    tiny_store: Path,
) -> None:
    """ENOSPC mid-stream: REJECT storage, exit 8, no final file and no temporary."""
    pw = password_file(tmp_path, mariadb.root_password)
    deployment.store = tiny_store
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["bulky"]', password_file=pw)
        )
        run = await run_agent(config)
    assert run.returncode == 8, run.stderr
    assert "disk full" in run.stderr
    no_traceback(run.stderr)
    assert stored_files(tiny_store) == []
    assert "disk full" in log_text(deployment.collector_logs)


async def test_database_killed_mid_dump_leaves_nothing(
    mariadb_fresh: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """The server dies during the dump: ABORT, exit 5, nothing kept on either side."""
    from tests.integration.sample_data import generate_bulk

    generate_bulk(mariadb_fresh, "victim", 150 * 1024 * 1024)
    pw = password_file(tmp_path, mariadb_fresh.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb_fresh.port, '["victim"]', password_file=pw)
        )
        agent = asyncio.create_task(run_agent(config))
        await wait_for(lambda: upload_under_way(deployment.store, 256 * 1024),
                       "the backup to start streaming")
        mariadb_fresh.kill()
        run = await agent
    assert run.returncode == 5, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "FAILED  main/victim" in run.stderr
    assert stored_files(deployment.store) == []
    assert "agent aborted" in log_text(deployment.collector_logs)


class HoldingProxy(LoopbackProxy):
    """Holds each connection ``hold`` seconds before passing it through, watching
    meanwhile for a dump tool started by the agent whose command line has ``marker``."""

    def __init__(self, target_port: int, hold: float) -> None:
        super().__init__(target_port)
        self.hold = hold
        self.marker = ""
        self.dump_seen_while_held: list[bool] = []
        self.dump_running_at_release: list[bool] = []
        self.released_at: list[datetime] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The hold is what these tests are about (a collector slow to answer), so it is
        # timed; meanwhile the proxy looks for the dump every 10 ms.
        deadline = asyncio.get_running_loop().time() + self.hold
        seen = False
        while asyncio.get_running_loop().time() < deadline:
            seen = seen or agent_dump_running(self.marker)
            await asyncio.sleep(0.01)
        self.dump_seen_while_held.append(seen)
        self.dump_running_at_release.append(agent_dump_running(self.marker))
        self.released_at.append(datetime.now(UTC))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self.copy(reader, up_writer), self.copy(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.close()


def agent_dump_running(marker: str) -> bool:
    """Whether a mariadb-dump runs whose parent's command line contains ``marker``."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "mariadb-dump":
                continue
            status = (comm.parent / "status").read_text()
            ppid = next(line.split()[1] for line in status.splitlines()
                        if line.startswith("PPid:"))
            if marker in Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace"):
                return True
        except (OSError, StopIteration):
            continue
    return False


async def back_up_bulky_with_the_connection_held(
    hold: float, mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> HoldingProxy:
    """Back up `bulky` while a proxy holds the agent's connection for ``hold`` seconds."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with (
        running_collector(deployment.collector_toml()) as (_, port),
        HoldingProxy(port, hold=hold) as proxy,
    ):
        config = deployment.agent_toml(
            "db1", proxy.port, mysql_source(mariadb.port, '["bulky"]', password_file=pw)
        )
        proxy.marker = str(config)
        run = await run_agent(config)
    assert run.returncode == 0, run.stdout + run.stderr
    return proxy


async def test_the_dump_starts_while_the_collector_connection_is_being_made(
    mariadb: MariaDBServer, bulky: str, deployment: Deployment, tmp_path: Path
) -> None:
    """The agent dumps while it connects; what it makes meanwhile is sent whole after."""
    proxy = await back_up_bulky_with_the_connection_held(2.0, mariadb, deployment, tmp_path)
    assert proxy.dump_seen_while_held == [True], "the dump waited for the SSH connection"
    assert "stopped the dump" not in log_text(deployment.agent_logs)
    (backup,) = (deployment.store / "db1" / "bulky").glob("*.sql.zst")
    manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
    assert manifest["verified"] is True
    # The backup is dated by its dump, which began while the connection was held.
    (released,) = proxy.released_at
    assert datetime.fromisoformat(manifest["started_at"]) <= released - timedelta(seconds=1)
    assert manifest["verification"]["uncompressed_bytes"] > 50 * 1024 * 1024
    restore(mariadb, backup, "restored_bulky")
    assert table_checksums(mariadb, "restored_bulky") == table_checksums(mariadb, "bulky")


async def test_a_dump_waiting_too_long_for_the_collector_is_stopped_and_started_again(
    mariadb: MariaDBServer, bulky: str, deployment: Deployment, tmp_path: Path
) -> None:
    """The collector answers only after 8 s: the dump fills its head start, waits 5 s,
    is stopped (no snapshot or table lock held meanwhile) and runs again once the
    connection is made; the backup is whole."""
    proxy = await back_up_bulky_with_the_connection_held(8.0, mariadb, deployment, tmp_path)
    assert proxy.dump_seen_while_held == [True]
    assert proxy.dump_running_at_release == [False], "the dump held its snapshot all along"
    assert "stopped the dump, to start it again once the collector answers" in log_text(
        deployment.agent_logs
    )
    (backup,) = (deployment.store / "db1" / "bulky").glob("*.sql.zst")
    # Dated by the dump that made it, started once the connection went through, not by
    # the one stopped 8 s earlier: across midnight, that one would name the wrong day.
    manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
    (released,) = proxy.released_at
    assert datetime.fromisoformat(manifest["started_at"]) >= released - timedelta(seconds=1)
    restore(mariadb, backup, "restored_late")
    assert table_checksums(mariadb, "restored_late") == table_checksums(mariadb, "bulky")


async def test_connection_cut_mid_stream_leaves_nothing(
    mariadb: MariaDBServer, bulky: str, deployment: Deployment, tmp_path: Path
) -> None:
    """The network drops mid-upload: the agent fails (exit 4), the collector keeps nothing."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        async with CuttingProxy(port, limit=3 * 1024 * 1024) as proxy:
            config = deployment.agent_toml(
                "db1", proxy.port, mysql_source(mariadb.port, '["bulky"]', password_file=pw)
            )
            run = await run_agent(config)
        # The collector may learn of the cut after the agent has given up.
        await wait_for(
            lambda: re.search(r"backup db1/bulky \[\S+\] from \S+ failed \(",
                              log_text(deployment.collector_logs)),
            "the collector to fail the cut upload",
        )
    assert run.returncode == 4, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "FAILED  main/bulky" in run.stderr
    assert stored_files(deployment.store) == []
