"""`backhaul-agent restore` end to end: a real MariaDB, the real command, a real collector.

Each test backs up with the real agent, then restores through LIST and FETCH over SSH
and compares the result with CHECKSUM TABLE on the same server.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

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
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.sample_data import object_counts, table_checksums

pytestmark = pytest.mark.integration


def databases(server: MariaDBServer) -> set[str]:
    return {str(row[0]) for row in server.query("SHOW DATABASES")}


def restore_args(config: Path, database: str, *extra: str) -> list[str]:
    return ["restore", "--config", str(config), "--database", database, *extra]


async def test_restore_into_another_database_matches_the_original(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """backup → restore --into: every table's CHECKSUM TABLE and every routine come back."""
    mariadb.execute("DROP DATABASE IF EXISTS restored_tricky")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky", "my-db"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        run = await run_cli(*restore_args(config, "tricky", "--into", "restored_tricky"))
        hyphen = await run_cli(*restore_args(config, "my-db", "--into", "restored-my-db"))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    (stored,) = backups(deployment.store, "db1", "tricky")
    assert run.stdout.startswith(f"restored {stored.name} into restored_tricky")
    assert manifest_of(stored)["sha256"] in run.stdout
    assert table_checksums(mariadb, "restored_tricky") == table_checksums(mariadb, "tricky")
    assert object_counts(mariadb, "restored_tricky") == object_counts(mariadb, "tricky")
    assert hyphen.returncode == 0, hyphen.stderr
    assert table_checksums(mariadb, "restored-my-db") == table_checksums(mariadb, "my-db")
    assert "fetched" in log_text(deployment.collector_logs)


async def test_restore_refuses_a_database_with_tables_unless_forced(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A target with tables is refused (exit 2, untouched); --force replaces it exactly."""
    mariadb.execute("DROP DATABASE IF EXISTS occupied")
    mariadb.execute("CREATE DATABASE occupied")
    mariadb.execute("CREATE TABLE occupied.precious (id INT PRIMARY KEY)")
    mariadb.execute("INSERT INTO occupied.precious VALUES (1), (2)")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        refused = await run_cli(*restore_args(config, "tricky", "--into", "occupied"))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "already holds 1 object(s)" in refused.stderr
        assert "--force" in refused.stderr
        assert mariadb.query("SELECT COUNT(*) FROM occupied.precious")[0][0] == 2
        forced = await run_cli(*restore_args(config, "tricky", "--into", "occupied", "--force"))
    assert forced.returncode == 0, forced.stderr
    assert table_checksums(mariadb, "occupied") == table_checksums(mariadb, "tricky")
    assert "precious" not in table_checksums(mariadb, "occupied")


async def test_restore_into_an_existing_empty_database_needs_no_force(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """An empty target is used as it is, keeping its character set."""
    mariadb.execute("DROP DATABASE IF EXISTS empty_target")
    mariadb.execute("CREATE DATABASE empty_target CHARACTER SET latin1")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["my-db"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        run = await run_cli(*restore_args(config, "my-db", "--into", "empty_target"))
    assert run.returncode == 0, run.stderr
    assert table_checksums(mariadb, "empty_target") == table_checksums(mariadb, "my-db")
    charset = mariadb.query(
        "SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
        "WHERE SCHEMA_NAME = 'empty_target'"
    )
    assert charset[0][0] == "latin1"


def move_to_day(backup: Path, day: date, seq: int = 1) -> Path:
    """Make a stored backup look as if it had been made on ``day``."""
    ext = backup.name.split(".", 1)[1]
    suffix = "" if seq == 1 else f"-{seq}"
    moved = backup.with_name(f"{backup.name.split('_')[0]}_{day:%Y%m%d}{suffix}.{ext}")
    manifest = manifest_of(backup)
    manifest["started_at"] = f"{day.isoformat()}T02:3{seq}:00+00:00"
    Path(f"{backup}.manifest.json").rename(f"{moved}.manifest.json")
    backup.rename(moved)
    write_manifest(moved, manifest)
    return moved


async def test_date_picks_the_newest_backup_of_that_day(
    mariadb: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """--date restores that day's newest backup; without it the newest of all; an empty
    day is an error that lists the days there are."""
    mariadb.create_database("dated")
    mariadb.execute("CREATE TABLE t (id INT PRIMARY KEY)", database="dated")
    mariadb.execute("INSERT INTO dated.t VALUES (1)")
    pw = password_file(tmp_path, mariadb.root_password)
    old_day = date(2024, 1, 15)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["dated"]', password_file=pw)
        )
        for new_row in (2, 3):  # two backups, holding 1 and then 2 rows
            assert (await run_agent(config)).returncode == 0
            mariadb.execute("INSERT INTO dated.t VALUES (%s)", args=(new_row,))
        second, first = backups(deployment.store, "db1", "dated")  # "-2" sorts first
        assert second.name.endswith("-2.sql.zst")
        move_to_day(first, old_day, 1)
        move_to_day(second, old_day, 2)
        assert (await run_agent(config)).returncode == 0  # today's, with 3 rows
        by_day = await run_cli(
            *restore_args(config, "dated", "--date", "20240115", "--into", "dated_old")
        )
        newest = await run_cli(*restore_args(config, "dated", "--into", "dated_new"))
        missing = await run_cli(
            *restore_args(config, "dated", "--date", "20230101", "--into", "dated_none")
        )
    assert by_day.returncode == 0, by_day.stderr
    assert f"dated_{old_day:%Y%m%d}-2.sql.zst" in by_day.stdout
    assert mariadb.query("SELECT COUNT(*) FROM dated_old.t")[0][0] == 2
    assert newest.returncode == 0, newest.stderr
    assert mariadb.query("SELECT COUNT(*) FROM dated_new.t")[0][0] == 3
    assert missing.returncode == 1
    assert "no mysql backup of dated from 20230101" in missing.stderr
    assert "20240115" in missing.stderr
    assert "dated_none" not in databases(mariadb)


def flip_a_byte(backup: Path, offset_fraction: float = 0.5) -> None:
    backup.chmod(0o640)
    data = bytearray(backup.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    backup.write_bytes(bytes(data))


async def test_tampered_backup_is_detected_while_fetching_and_nothing_is_loaded(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """One flipped bit in the stored file: exit 7, SHA-256 named, target never created."""
    mariadb.execute("DROP DATABASE IF EXISTS from_tampered")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "tricky")
        flip_a_byte(stored)
        run = await run_cli(*restore_args(config, "tricky", "--into", "from_tampered"))
    assert run.returncode == 7, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "SHA-256" in run.stderr or "corrupt" in run.stderr
    assert "from_tampered" not in databases(mariadb)


async def test_truncated_backup_is_detected_and_nothing_is_loaded(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A stored file shorter than its manifest says: exit 7 and the byte counts named."""
    mariadb.execute("DROP DATABASE IF EXISTS from_truncated")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "tricky")
        stored.chmod(0o640)
        size = stored.stat().st_size
        with stored.open("r+b") as handle:
            handle.truncate(size - 100)
        run = await run_cli(*restore_args(config, "tricky", "--into", "from_truncated"))
    assert run.returncode == 7, run.stdout + run.stderr
    assert f"received {size - 100} bytes, the manifest records {size}" in run.stderr
    assert "from_truncated" not in databases(mariadb)


async def test_no_backup_and_unknown_source_are_one_line_errors(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        nothing = await run_cli(*restore_args(config, "tricky", "--into", "x_nothing"))
        unknown = await run_cli(*restore_args(config, "tricky", "--source", "nope"))
        bad_date = await run_cli(*restore_args(config, "tricky", "--date", "2024-01-15"))
    assert nothing.returncode == 1 and "no mysql backup of tricky" in nothing.stderr
    assert unknown.returncode == 2 and "no source named 'nope'" in unknown.stderr
    assert bad_date.returncode == 2 and "yyyymmdd" in bad_date.stderr
    for run in (nothing, unknown, bad_date):
        assert "Traceback" not in run.stderr
    for run in (nothing, unknown):
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def restorer(mariadb: MariaDBServer, tmp_path: Path, grants: str) -> Path:
    """A fresh account `restorer` with ``grants`` on every database; its password file."""
    mariadb.execute("DROP USER IF EXISTS 'restorer'@'%'")
    mariadb.execute("CREATE USER 'restorer'@'%' IDENTIFIED BY 'r3st0re'")
    mariadb.execute(f"GRANT {grants} ON *.* TO 'restorer'@'%'")
    folder = tmp_path / "restorer"
    folder.mkdir(exist_ok=True)
    return password_file(folder, "r3st0re")


async def test_restore_names_the_missing_privileges_before_touching_anything(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Table grants only, binlog on, a dump with routines and triggers: refused up front
    (exit 5) naming TRIGGER, CREATE ROUTINE, the binlog setting and SUPER; no database."""
    mariadb.execute("DROP DATABASE IF EXISTS never_made")
    mariadb.execute("SET GLOBAL log_bin_trust_function_creators = 0")
    limited = restorer(mariadb, tmp_path, "SELECT, INSERT, CREATE, DROP, ALTER, LOCK TABLES")
    root_pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        backup = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=root_pw)
        )
        assert (await run_agent(backup)).returncode == 0
        config = deployment.agent_toml("db1", port, mysql_source(
            mariadb.port, '["tricky"]', password_file=limited, user="restorer"))
        run = await run_cli(*restore_args(config, "tricky", "--into", "never_made"))
    assert run.returncode == 5, run.stdout + run.stderr
    for needed in ("TRIGGER", "CREATE ROUTINE", "EVENT", "CREATE VIEW",
                   "log_bin_trust_function_creators", "SUPER (the dump's objects name DEFINER"):
        assert needed in run.stderr, run.stderr
    assert "nothing was changed" in run.stderr
    assert "never_made" not in databases(mariadb)


def inject_a_failing_statement(stored: Path) -> None:
    """Rewrite a stored SQL backup (and its manifest) so that it is whole and verified but
    its load fails on the server after the first table: a failure half-way."""
    import hashlib

    import zstandard

    sql = zstandard.ZstdDecompressor().stream_reader(stored.read_bytes()).read()
    marker = b"UNLOCK TABLES;\n"
    cut = sql.index(marker) + len(marker)
    sql = sql[:cut] + b"INSERT INTO `no_such_table` VALUES (1);\n" + sql[cut:]
    data = zstandard.ZstdCompressor().compress(sql)
    stored.chmod(0o640)
    stored.write_bytes(data)
    manifest = manifest_of(stored)
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    write_manifest(stored, manifest)


async def test_a_restore_failing_half_way_drops_the_database_it_created(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """The server fails the load after one table: the new database is dropped again, and
    the message says both what failed and that it was cleaned."""
    mariadb.execute("DROP DATABASE IF EXISTS half_done")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "tricky")
        inject_a_failing_statement(stored)
        run = await run_cli(*restore_args(config, "tricky", "--into", "half_done"))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "no_such_table" in run.stderr
    assert "'half_done', which this restore created, dropped again" in run.stderr
    assert "Traceback" not in run.stderr
    assert "half_done" not in databases(mariadb)


async def test_a_restore_failing_half_way_into_an_empty_database_leaves_it_empty(
    mariadb: MariaDBServer, samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    mariadb.execute("DROP DATABASE IF EXISTS kept_empty")
    mariadb.execute("CREATE DATABASE kept_empty")
    pw = password_file(tmp_path, mariadb.root_password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["tricky"]', password_file=pw)
        )
        assert (await run_agent(config)).returncode == 0
        (stored,) = backups(deployment.store, "db1", "tricky")
        inject_a_failing_statement(stored)
        run = await run_cli(*restore_args(config, "tricky", "--into", "kept_empty"))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "emptied again" in run.stderr
    assert "kept_empty" in databases(mariadb)
    assert object_counts(mariadb, "kept_empty") == object_counts(mariadb, "no_such_database")
