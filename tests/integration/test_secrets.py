"""The database password never leaves its file: not argv, not an environment, not a log.

A real backup (real MariaDB, the real `backhaul-agent` command, a real collector) runs as
a user whose password is a canary. While the dump runs, every process's command line
and environment are sampled; afterwards the logs, manifests, file names, stored dumps
and the agent's output are searched. The distinctive middle of the canary is what is
looked for, so an escaped or quoted copy is caught too.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from tests.integration.harness import (
    Deployment,
    log_text,
    mysql_source,
    run_agent,
    running_collector,
    stored_files,
)
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.pg_ops import pg_source
from tests.integration.postgres_server import PostgresServer
from tests.integration.sample_data import generate_bulk

pytestmark = pytest.mark.integration

DATABASE = "secrets_bulk"
USER = "canary_backup"
DUMP_TOOLS = (b"mariadb-dump", b"mysqldump", b"pg_dump")
PG_DATABASE = f"PGDATABASE={DATABASE}".encode()  # pg_dump finds its database there


@pytest.fixture(scope="module")
def bulk(mariadb: MariaDBServer) -> str:
    """A database whose dump takes long enough to be watched (a few seconds)."""
    generate_bulk(mariadb, DATABASE, 40 * 1024 * 1024)
    return DATABASE


@dataclass
class Sightings:
    """What the sampler saw: the canary (where) and the dump tool (how often)."""

    leaks: list[str] = field(default_factory=list)
    dump_samples: int = 0
    rounds: int = 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended, or is not ours to read
        return b""


def sample_processes(token: bytes, seen: Sightings) -> None:
    """One pass over /proc: every process's argv and environment."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        cmdline = _read(proc / "cmdline")
        environ = _read(proc / "environ")
        for what, data in (("cmdline", cmdline), ("environ", environ)):
            if token in data:
                seen.leaks.append(f"{what} of pid {proc.name}: {cmdline[:200]!r}")
        names_database = DATABASE.encode() in cmdline or PG_DATABASE in environ
        if any(tool in cmdline for tool in DUMP_TOOLS) and names_database:
            seen.dump_samples += 1
    seen.rounds += 1


class Sampler(threading.Thread):
    """Samples /proc in a thread, so the collector in this event loop is not slowed."""

    def __init__(self, token: bytes) -> None:
        super().__init__(daemon=True)
        self.token = token
        self.seen = Sightings()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sample_processes(self.token, self.seen)
            time.sleep(0.005)


def files_holding(token: bytes, *roots: Path) -> list[Path]:
    """Files under ``roots`` whose bytes (or decompressed bytes) hold ``token``."""
    found = []
    for root in roots:
        try:
            paths = [p for p in root.rglob("*") if p.is_file()]
        except OSError:  # a folder another process removed meanwhile
            continue
        for path in paths:
            data = _read(path)
            if path.suffix == ".zst":
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            if token in data or token in str(path).encode():
                found.append(path)
    return found


@pytest.fixture
def canary(mariadb: MariaDBServer, bulk: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A MariaDB user with a canary password, and the 0600 file that holds it."""
    token = secrets.token_hex(12)
    password = f'Cy-{token}-p@ss w"rd\\$x'
    mariadb.create_user(USER, password)
    path = tmp_path / "secret" / "mysql.pass"
    path.parent.mkdir(mode=0o700)
    path.write_text(password + "\n")
    path.chmod(0o600)
    yield token, path
    mariadb.execute(f"DROP USER IF EXISTS {USER}@'%'")


async def test_password_appears_in_no_process_log_manifest_or_output(
    mariadb: MariaDBServer, canary: tuple[str, Path], tmp_path: Path
) -> None:
    """Sampled throughout the dump and searched afterwards, the canary is nowhere."""
    token, password_file = canary
    needle = token.encode()
    deployment = Deployment(tmp_path / "deployment")
    deployment.add_agent("db1")
    shm_before = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").is_dir() else set()
    sampler = Sampler(needle)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1",
            port,
            mysql_source(mariadb.port, f'["{DATABASE}"]', password_file=password_file, user=USER),
        )
        sampler.start()
        try:
            run = await run_agent(config, timeout=240)
        finally:
            sampler.stop.set()
            await asyncio.to_thread(sampler.join, 10)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = sampler.seen
    assert seen.dump_samples >= 3, f"the dump was seen in only {seen.dump_samples} samples"
    assert seen.leaks == []

    (backup,) = (deployment.store / "db1" / DATABASE).glob("*.sql.zst")
    manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
    assert manifest["database"] == DATABASE and manifest["verified"] is True
    for text, where in (
        (run.stdout, "agent stdout"),
        (run.stderr, "agent stderr"),
        (log_text(deployment.collector_logs), "collector log"),
        (log_text(deployment.agent_logs), "agent log"),
        (config.read_text(), "agent config"),
        (" ".join(str(p) for p in stored_files(deployment.store)), "stored file names"),
    ):
        assert token not in text, where
    assert (
        files_holding(needle, deployment.store, deployment.collector_logs, deployment.agent_logs)
        == []
    )
    # The option file lived in memory-backed storage only while the dump tool read it.
    new_in_shm = [p for p in Path("/dev/shm").glob("*") if p not in shm_before]
    assert files_holding(needle, *(p for p in new_in_shm if p.is_dir())) == []


async def test_the_sampler_sees_a_secret_in_argv_and_environment() -> None:
    """Control: a process holding the token in its argv or environment is reported."""
    token = secrets.token_hex(12)
    code = "import sys, time; sys.stdout.write('ready'); sys.stdout.flush(); time.sleep(30)"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args, env=env, stdout=asyncio.subprocess.PIPE
        )
        for args, env in (([token], {}), ([], {"PASSWORD": token}))
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await proc.stdout.read(5) == b"ready"
        seen = Sightings()
        sample_processes(token.encode(), seen)
        assert sorted(leak.split()[0] for leak in seen.leaks) == ["cmdline", "environ"]
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


@pytest.fixture
def pg_canary(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A PostgreSQL role with a canary password (a ':' and a '\\' for the passfile's
    escapes), a database it reads that takes seconds to dump, and its 0600 file."""
    token = secrets.token_hex(12)
    password = f'Cy-{token}-p@ss:w"rd\\$x'
    postgres.execute("postgres", f"DROP DATABASE IF EXISTS {DATABASE}",
                     f"CREATE DATABASE {DATABASE}", f"DROP ROLE IF EXISTS {USER}")
    postgres.execute(DATABASE, "CREATE TABLE bulk AS SELECT g, md5(g::text) AS a, "
                               "repeat(md5(g::text), 4) AS b FROM generate_series(1, 400000) g")
    with postgres.connect() as conn:
        conn.execute(f"CREATE ROLE {USER} LOGIN IN ROLE pg_read_all_data PASSWORD "
                     "'" + password.replace("'", "''") + "'")
    path = tmp_path / "secret" / "pg.pass"
    path.parent.mkdir(mode=0o700)
    path.write_text(password + "\n")
    path.chmod(0o600)
    yield token, path
    postgres.execute("postgres", f"DROP DATABASE IF EXISTS {DATABASE}", f"DROP ROLE {USER}")


async def test_postgres_password_appears_in_no_process_log_manifest_or_output(
    postgres: PostgresServer, pg_canary: tuple[str, Path], tmp_path: Path
) -> None:
    """pg_dump gets the canary through a 0600 PGPASSFILE only: never argv, never the
    environment (no PGPASSWORD), never a log, and the passfile is gone afterwards."""
    token, password_file = pg_canary
    needle = token.encode()
    deployment = Deployment(tmp_path / "deployment")
    deployment.add_agent("db1")
    shm_before = set(Path("/dev/shm").iterdir()) if Path("/dev/shm").is_dir() else set()
    sampler = Sampler(needle)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, pg_source(
            postgres, f'["{DATABASE}"]', password_file=password_file, user=USER,
            extra="globals = false\n"))
        sampler.start()
        try:
            run = await run_agent(config, timeout=240)
        finally:
            sampler.stop.set()
            await asyncio.to_thread(sampler.join, 10)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = sampler.seen
    assert seen.dump_samples >= 3, f"the dump was seen in only {seen.dump_samples} samples"
    assert seen.leaks == []
    for text, where in (
        (run.stdout, "agent stdout"),
        (run.stderr, "agent stderr"),
        (log_text(deployment.collector_logs), "collector log"),
        (log_text(deployment.agent_logs), "agent log"),
    ):
        assert token not in text, where
    assert (
        files_holding(needle, deployment.store, deployment.collector_logs, deployment.agent_logs)
        == []
    )
    assert [p for p in Path("/dev/shm").glob("backhaul-pg-*") if p not in shm_before] == []
