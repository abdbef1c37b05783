"""PostgreSQL end to end: a real server, the real agent command, a real collector.

Backups are made with `backhaul-agent backup`, restored with `backhaul-agent restore`
through LIST and FETCH over SSH, and compared table by table (an md5 over each table's
ordered rows) with the originals on the same server.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from pg_sample_data import HYPHEN, READER_ROLE, TRICKY, UNICODE, fingerprint

from common.naming import encode_database
from tests.integration.agent_ops import backups, manifest_of, password_file
from tests.integration.harness import (
    ROOT,
    Deployment,
    log_text,
    run_agent,
    run_cli,
    running_collector,
)
from tests.integration.pg_ops import pg_source, run_tool, stock_env
from tests.integration.postgres_server import PostgresServer

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
    # The collector's own re-check from disk (the weekly `verify`) reads both formats.
    status, out, err = await run_tool(
        sys.executable, "-m", "collector.cli", "verify", "--config",
        str(deployment.collector_toml()), "--all", env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert status == 0, out + err
    assert out.decode().splitlines()[-1] == "2 backup(s) checked, 0 mismatch(es)"
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


async def test_globals_restore_brings_back_a_dropped_role(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """`restore --database _globals` recreates roles with their attributes; the roles that
    still exist are left as they are."""
    postgres.execute("postgres", "DROP ROLE IF EXISTS auditor",
                     "CREATE ROLE auditor NOLOGIN CONNECTION LIMIT 3",
                     f"GRANT {READER_ROLE} TO auditor")
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port,
                                       pg_source(postgres, '["my-db"]', password_file=pw))
        assert (await run_agent(config)).returncode == 0
        postgres.execute("postgres", "DROP ROLE auditor")
        elsewhere = await run_cli(*restore_args(config, "_globals", "--into", "x"))
        run = await run_cli(*restore_args(config, "_globals"))
    assert elsewhere.returncode == 2 and "without --into" in elsewhere.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("restored _globals_")
    assert postgres.query("postgres", "SELECT rolconnlimit, rolcanlogin FROM pg_roles "
                                      "WHERE rolname = 'auditor'") == [(3, False)]
    assert postgres.query("postgres", "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r "
                                      "ON r.oid = m.member WHERE r.rolname = 'auditor'") == [(1,)]


async def test_restore_refuses_an_occupied_database_and_force_replaces_it(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A target with tables is refused (exit 2, untouched); --force replaces it exactly."""
    postgres.execute("postgres", "DROP DATABASE IF EXISTS occupied", "CREATE DATABASE occupied")
    postgres.execute("occupied", "CREATE TABLE precious (id int)",
                     "INSERT INTO precious VALUES (1)")
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port,
                                       pg_source(postgres, '["tricky"]', password_file=pw))
        assert (await run_agent(config)).returncode == 0
        refused = await run_cli(*restore_args(config, TRICKY, "--into", "occupied"))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert postgres.query("occupied", "SELECT count(*) FROM precious") == [(1,)]
        forced = await run_cli(*restore_args(config, TRICKY, "--into", "occupied", "--force"))
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert fingerprint(postgres, "occupied") == fingerprint(postgres, TRICKY)


async def test_drill_restores_into_scratch_compares_and_drops_it(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """`drill` passes for a database and for the globals, and leaves no scratch database."""
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port,
                                       pg_source(postgres, '["tricky"]', password_file=pw))
        assert (await run_agent(config)).returncode == 0
        drill = await run_cli("drill", "--config", str(config), "--database", TRICKY)
        roles = await run_cli("drill", "--config", str(config), "--database", "_globals")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "drill passed: pg_restore loaded 6 table(s), as the archive lists" in drill.stdout
    assert roles.returncode == 0, roles.stdout + roles.stderr
    assert "globals backup verified whole" in roles.stdout
    scratch = postgres.query("postgres", "SELECT datname FROM pg_database "
                                         "WHERE datname LIKE 'backhaul_drill_%'")
    assert scratch == []
    assert "restore drill of tricky passed" in log_text(deployment.collector_logs)


async def test_drill_fails_when_the_restore_fails(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A restore error (an owner role that is gone) fails the drill, reported as such."""
    postgres.execute("postgres", "DROP DATABASE IF EXISTS owned", "DROP ROLE IF EXISTS owner_x",
                     "CREATE ROLE owner_x", "CREATE DATABASE owned")
    postgres.execute("owned", "CREATE TABLE t (id int)", "ALTER TABLE t OWNER TO owner_x")
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, pg_source(
            postgres, '["owned"]', password_file=pw, extra="globals = false\n"))
        assert (await run_agent(config)).returncode == 0
        postgres.execute("postgres", "DROP DATABASE owned", "DROP ROLE owner_x")
        drill = await run_cli("drill", "--config", str(config), "--database", "owned")
    assert drill.returncode != 0, drill.stdout + drill.stderr
    assert "DRILL FAILED (restore)" in drill.stdout + drill.stderr
    assert 'role "owner_x" does not exist' in drill.stdout + drill.stderr
    assert postgres.query("postgres", "SELECT datname FROM pg_database "
                                      "WHERE datname LIKE 'backhaul_drill_%'") == []
