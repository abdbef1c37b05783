"""`backhaul-agent drill` end to end: real MariaDB and MongoDB wire servers, the real
command, a real collector with its metrics endpoint."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pymongo
import pytest

from tests.integration.agent_ops import backups, manifest_of, password_file, write_manifest
from tests.integration.harness import (
    Deployment,
    log_text,
    mysql_source,
    run_agent,
    run_cli,
    running_collector,
)
from tests.integration.loopback import free_port
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.mongo_server import NxServer

pytestmark = pytest.mark.integration


def collector_toml(deployment: Deployment, metrics_port: int, databases: str) -> Path:
    return deployment.collector_toml(
        agent_extra={"db1": f"databases = {databases}\n"},
        extra=f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )


async def metric(port: int, name: str, database: str) -> float | None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    pattern = rf'^{name}{{agent="db1",database="{re.escape(database)}"}} (\S+)$'
    match = re.search(pattern, text, flags=re.MULTILINE)
    return float(match[1]) if match else None


def scratch_databases(server: MariaDBServer) -> list[str]:
    return [str(r[0]) for r in server.query("SHOW DATABASES LIKE 'backhaul\\_drill\\_%'")]


def drill_args(config: Path, database: str) -> list[str]:
    return ["drill", "--config", str(config), "--database", database]


async def test_drill_passes_reports_and_leaves_no_scratch_database(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """The latest backup restores and matches its recorded checksums; the collector logs
    the pass and sets the drill success time; the scratch database is gone."""
    pw = password_file(tmp_path, mariadb.root_password)
    metrics_port = free_port()
    toml = collector_toml(deployment, metrics_port, '["tricky", "my-db"]')
    async with running_collector(toml) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw,
                                        extra="record_checksums = true\n")
        )
        assert (await run_agent(config)).returncode == 0
        assert (
            await metric(metrics_port, "backhaul_drill_last_success_timestamp_seconds", "tricky")
            is None
        )
        run = await run_cli(*drill_args(config, "tricky"))
        success = await metric(
            metrics_port, "backhaul_drill_last_success_timestamp_seconds", "tricky"
        )
        result = await metric(metrics_port, "backhaul_drill_last_attempt_success", "tricky")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "drill passed" in run.stdout
    assert "row counts and CHECKSUM TABLE match" in run.stdout
    assert success is not None and success > 0
    assert result == 1
    assert "restore drill of tricky passed" in log_text(deployment.collector_logs)
    assert scratch_databases(mariadb) == []
    dump = manifest_of(backups(deployment.store, "db1", "tricky")[0])["dump"]
    assert dump["binlog_unchanged"] is True
    assert set(dump["checksums"]["tables"]) == {
        "attachments",
        "audit",
        "customers",
        "order",
        "select",
    }


async def test_drill_against_a_tampered_manifest_checksum_fails_and_is_reported(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A recorded checksum that no longer matches: exit 7, drill_failed at the collector,
    metrics say the last drill failed, and the scratch database is dropped anyway."""
    pw = password_file(tmp_path, mariadb.root_password)
    metrics_port = free_port()
    toml = collector_toml(deployment, metrics_port, '["tricky"]')
    async with running_collector(toml) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw,
                                        extra="record_checksums = true\n")
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "tricky")
        manifest = manifest_of(stored)
        manifest["dump"]["checksums"]["tables"]["customers"][1] += 1
        write_manifest(stored, manifest)
        run = await run_cli(*drill_args(config, "tricky"))
        result = await metric(metrics_port, "backhaul_drill_last_attempt_success", "tricky")
        success = await metric(
            metrics_port, "backhaul_drill_last_success_timestamp_seconds", "tricky"
        )
    assert run.returncode == 7, run.stdout + run.stderr
    assert "DRILL FAILED (mismatch)" in run.stderr
    assert "customers" in run.stderr
    assert "Traceback" not in run.stderr
    assert result == 0
    assert success == 0
    collector_log = log_text(deployment.collector_logs)
    assert "restore drill of tricky FAILED" in collector_log
    assert "customers" in collector_log
    assert scratch_databases(mariadb) == []


async def test_drill_of_a_damaged_backup_fails_as_integrity_and_drops_nothing_it_made(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Bytes changed on the collector: the drill fails before loading and says why."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["my-db"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "my-db")
        stored.chmod(0o640)
        stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
        run = await run_cli(*drill_args(config, "my-db"))
    assert run.returncode == 7, run.stdout + run.stderr
    assert "DRILL FAILED (integrity)" in run.stderr
    assert "restore drill of my-db FAILED" in log_text(deployment.collector_logs)
    assert scratch_databases(mariadb) == []


async def test_drill_without_recorded_checksums_compares_the_table_count(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """record_checksums = false: nothing recorded, the drill says what it compared."""
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        source = mysql_source(
            mariadb.port, '["my-db"]', password_file=pw, extra="record_checksums = false\n"
        )
        config = deployment.agent_toml("db1", port, source)
        assert (await run_agent(config)).returncode == 0
        run = await run_cli(*drill_args(config, "my-db"))
    dump = manifest_of(backups(deployment.store, "db1", "my-db")[0])["dump"]
    assert "checksums" not in dump
    assert run.returncode == 0, run.stdout + run.stderr
    assert "only the table count was compared" in run.stdout


async def test_drill_with_no_backup_fails_and_is_reported(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw,
                                        extra="record_checksums = true\n")
        )
        run = await run_cli(*drill_args(config, "tricky"))
    assert run.returncode == 1
    assert "DRILL FAILED (no_backup)" in run.stderr
    assert "restore drill of tricky FAILED" in log_text(deployment.collector_logs)


def mongo_source(uri: str, databases: str) -> str:
    return textwrap.dedent(f"""
        [[sources]]
        name = "mongo"
        engine = "mongodb"
        uri = "{uri}"
        databases = {databases}
    """)


@pytest.fixture
def ward(nx_server: NxServer) -> str:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(nx_server.uri)
    try:
        client.drop_database("ward")
        client["ward"].beds.insert_many({"_id": i, "label": f"bed {i}"} for i in range(250))
        client["ward"].staff.insert_many({"name": n} for n in ("Ana", "Ben", "Cleo"))
        client["ward"].create_collection("empty")
    finally:
        client.close()
    return "ward"


async def test_mongodb_drill_compares_document_counts(
    nx_server: NxServer, ward: str, deployment: Deployment
) -> None:
    """A MongoDB backup restores into a scratch database with the counts the dump wrote."""
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, mongo_source(nx_server.uri, '["ward"]'))
        backup = await run_agent(config)
        assert backup.returncode == 0, backup.stderr
        run = await run_cli(*drill_args(config, "ward"))
        restored = await run_cli(
            "restore", "--config", str(config), "--database", "ward", "--into", "ward_copy"
        )
        refused = await run_cli("restore", "--config", str(config), "--database", "ward")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 collections, 253 documents restored" in run.stdout
    assert "restore drill of ward passed" in log_text(deployment.collector_logs)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(nx_server.uri)
    try:
        assert not [n for n in client.list_database_names() if n.startswith("backhaul_drill_")]
        assert restored.returncode == 0, restored.stderr
        assert client["ward_copy"].beds.count_documents({}) == 250
        assert sorted(client["ward_copy"].list_collection_names()) == ["beds", "empty", "staff"]
    finally:
        client.close()
    assert refused.returncode == 2 and "already holds 3 object(s)" in refused.stderr
