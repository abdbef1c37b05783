"""PostgreSQL end to end: a real server, the real agent command, a real collector.

Backups are made with `backhaul-agent backup`, restored with `backhaul-agent restore`
through LIST and FETCH over SSH, and compared table by table (an md5 over each table's
ordered rows) with the originals on the same server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_ops import backups, manifest_of, password_file
from harness import Deployment, run_agent, run_cli, running_collector
from pg_ops import pg_source, run_tool, stock_env
from pg_sample_data import HYPHEN, READER_ROLE, TRICKY, UNICODE, fingerprint
from postgres_server import PostgresServer

from common.naming import encode_database

pytestmark = pytest.mark.integration


def restore_args(config: Path, database: str, *extra: str) -> list[str]:
    return ["restore", "--config", str(config), "--database", database, *extra]


async def test_backup_and_restore_round_trip_every_table_of_the_tricky_databases(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """backup → restore --into: every table, sequence, large object, function, trigger,
    extension and grant comes back, for names with a hyphen and non-ASCII letters too."""
    pw = password_file(tmp_path, postgres.password)
    names = json.dumps(pg_samples)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, pg_source(postgres, names, password_file=pw))
        run = await run_agent(config)
        assert run.returncode == 0, run.stdout + run.stderr
        restored = {}
        for database in pg_samples:
            target = f"restored_{pg_samples.index(database)}"
            postgres.execute("postgres", f'DROP DATABASE IF EXISTS "{target}"')
            result = await run_cli(*restore_args(config, database, "--into", target))
            assert result.returncode == 0, result.stdout + result.stderr
            restored[database] = target
    for database, target in restored.items():
        assert fingerprint(postgres, target) == fingerprint(postgres, database), database
    (tricky,) = backups(deployment.store, "db1", TRICKY)
    assert tricky.name.endswith(".pgdump.zst")
    manifest = manifest_of(tricky)
    assert manifest["engine"] == "postgresql" and manifest["format"] == "pgdump"
    assert manifest["verified"] is True
    dump = manifest["dump"]
    assert "pgcrypto" in dump["extensions"]
    assert dump["wal_lsn_before_dump"]
    (globals_,) = backups(deployment.store, "db1", "_globals")
    assert globals_.name.startswith("_globals_") and globals_.name.endswith(".pgsql.zst")
    assert backups(deployment.store, "db1", HYPHEN)
    assert backups(deployment.store, "db1", encode_database(UNICODE))


async def test_stock_tools_read_the_stored_archive(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """The README's restore: `zstd -dc … | pg_restore -d db` and `zstd -dc … | psql`."""
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port,
                                       pg_source(postgres, '["tricky"]', password_file=pw))
        run = await run_agent(config)
    assert run.returncode == 0, run.stdout + run.stderr
    (backup,) = backups(deployment.store, "db1", TRICKY)
    (globals_,) = backups(deployment.store, "db1", "_globals")
    postgres.execute("postgres", "DROP DATABASE IF EXISTS stock", "CREATE DATABASE stock")
    env = stock_env(postgres)
    _, archive, _ = await run_tool("zstd", "-dc", str(backup))
    status, _, err = await run_tool("pg_restore", "--exit-on-error", "-d", "stock",
                                    stdin=archive, env=env)
    assert status == 0, err
    assert fingerprint(postgres, "stock") == fingerprint(postgres, TRICKY)
    _, roles, _ = await run_tool("zstd", "-dc", str(globals_))
    assert f"CREATE ROLE {READER_ROLE};".encode() in roles
    status, _, err = await run_tool("psql", "-X", "-q", "-d", "postgres", stdin=roles, env=env)
    assert status == 0, err
