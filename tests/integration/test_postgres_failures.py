"""PostgreSQL failures: each one clear line, nothing stored, the other databases go on.

Server down, wrong password, unknown database, missing privilege, pg_dump killed in the
middle of its stream, a pg_dump older than the server; and a real archive cut at many
offsets, refused by the ingest checker.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import zstandard

from agent.engines.pg_dump import PgDump
from agent.engines.pg_inspect import PgParams
from agent.stream.compress_thread import pump
from common.compression import make_compressor
from common.errors import DumpError, ExitCode, IntegrityError
from common.pg_archive import PgArchiveChecker
from tests.integration.agent_ops import backups, password_file
from tests.integration.harness import (
    Deployment,
    final_files,
    log_text,
    run_agent,
    running_collector,
)
from tests.integration.pg_ops import pg_source
from tests.integration.postgres_server import PostgresServer

pytestmark = pytest.mark.integration
BULK = "bulk"


def params(server: PostgresServer, password: str | None = None) -> PgParams:
    return PgParams(host=server.host, port=server.port, socket=None, user="postgres",
                    password=password if password is not None else server.password)


@pytest.fixture(scope="module")
def bulk(postgres: PostgresServer) -> str:
    """A database whose dump takes long enough to be cut (about 40 MB of rows)."""
    postgres.execute("postgres", f"DROP DATABASE IF EXISTS {BULK}", f"CREATE DATABASE {BULK}")
    postgres.execute(BULK, "CREATE TABLE rows AS SELECT g AS id, md5(g::text) AS a, "
                           "md5((g * 7)::text) AS b FROM generate_series(1, 500000) g")
    return BULK


async def dump_bytes(server: PostgresServer, database: str) -> bytes:
    """The dump through the agent's pump, as production reads it, decompressed again."""
    compressed = bytearray()

    async def send(out: bytes) -> None:
        compressed.extend(out)

    async with PgDump(params(server), database) as dump:
        await pump(dump, make_compressor("zstd"), send)
    return zstandard.ZstdDecompressor().decompressobj().decompress(bytes(compressed))


async def test_backup_of_a_stopped_server_fails_clearly_and_stores_nothing(
    postgres_fresh: PostgresServer, deployment: Deployment, tmp_path: Path
) -> None:
    """Server down: exit 5 (dump), the cause in one line, no file under a final name."""
    pw = password_file(tmp_path, postgres_fresh.password)
    postgres_fresh.stop()
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port,
                                       pg_source(postgres_fresh, '["app"]', password_file=pw))
        run = await run_agent(config)
    assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
    assert f"PostgreSQL at 127.0.0.1:{postgres_fresh.port}: server not running" in \
        log_text(deployment.agent_logs)
    # The collector, which alerts, heard of it.
    assert "agent db1 reports failure (dump)" in log_text(deployment.collector_logs)
    assert final_files(deployment.store) == []
    assert "Traceback" not in run.stderr


async def test_wrong_password_and_unknown_database_fail_while_the_others_are_stored(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """A database that does not exist fails alone; a wrong password fails every one."""
    good = password_file(tmp_path, postgres.password)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = password_file(bad_dir, "not-the-password")
    async with running_collector(deployment.collector_toml()) as (_, port):
        mixed = deployment.agent_toml("db1", port, pg_source(
            postgres, '["no_such_db", "my-db"]', password_file=good))
        run = await run_agent(mixed)
        assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
        logged = log_text(deployment.agent_logs)
        assert "database 'no_such_db' does not exist on 127.0.0.1" in logged
        assert backups(deployment.store, "db1", "my-db")
        assert backups(deployment.store, "db1", "_globals")
        assert not (deployment.store / "db1" / "no_such_db").exists()
        wrong = deployment.agent_toml("db1", port, pg_source(
            postgres, '["tricky"]', password_file=bad, name="pg2"))
        run = await run_agent(wrong)
    assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
    assert "refused user 'postgres': wrong password" in log_text(deployment.agent_logs)
    assert not (deployment.store / "db1" / "tricky").exists()


async def test_a_user_without_read_access_is_told_which_tables_it_cannot_read(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path
) -> None:
    """Missing privilege: the relations are named and pg_read_all_data is suggested."""
    postgres.execute("postgres", "DROP ROLE IF EXISTS weak",
                     "CREATE ROLE weak LOGIN PASSWORD 'weak-password'")
    pw = password_file(tmp_path, "weak-password")
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, pg_source(
            postgres, '["tricky"]', password_file=pw, user="weak", extra="globals = false\n"))
        run = await run_agent(config)
    assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
    logged = log_text(deployment.agent_logs)
    assert "user 'weak' may not read" in logged
    assert '"Sales Data"."Order"' in logged and "grant pg_read_all_data" in logged
    assert final_files(deployment.store) == []


async def test_a_pg_dump_older_than_the_server_is_refused_before_it_runs(
    postgres: PostgresServer, pg_samples: list[str], deployment: Deployment, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version mismatch: a pg_dump 11 on PATH cannot dump a newer server; it says so."""
    fake = tmp_path / "oldbin"
    fake.mkdir()
    tool = fake / "pg_dump"
    tool.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 11.22'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    pw = password_file(tmp_path, postgres.password)
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, pg_source(
            postgres, '["my-db"]', password_file=pw, extra="globals = false\n"))
        run = await run_agent(config)
    assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
    assert (f"is version 11 but the server at 127.0.0.1:{postgres.port} runs "
            f"{postgres.version}") in log_text(deployment.agent_logs)
    assert final_files(deployment.store) == []


async def test_pg_dump_killed_mid_stream_is_a_dump_error(
    postgres: PostgresServer, bulk: str
) -> None:
    """A pg_dump killed after its first bytes fails the dump with the signal named."""
    killed = False

    async def send(out: bytes) -> None:
        nonlocal killed
        if not killed and dump.pid is not None:
            os.kill(dump.pid, signal.SIGKILL)
            killed = True

    with pytest.raises(DumpError, match="pg_dump was killed by SIGKILL") as info:
        async with PgDump(params(postgres), bulk) as dump:
            await pump(dump, make_compressor("zstd"), send)
    assert killed
    assert info.value.returncode == -signal.SIGKILL
    assert dump.option_file is None or not dump.option_file.exists()


async def test_pg_dump_killed_mid_stream_leaves_nothing_stored(
    postgres: PostgresServer, bulk: str, deployment: Deployment, tmp_path: Path
) -> None:
    """End to end: the agent ABORTs, the collector keeps no file, the exit status is 5."""
    pw = password_file(tmp_path, postgres.password)
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    # A pg_dump that dies by SIGKILL after its first megabyte, like an OOM kill.
    (wrapper / "pg_dump").write_text(
        "#!/bin/bash\n"
        "if [ \"$1\" = --version ]; then exec /usr/bin/pg_dump --version; fi\n"
        "/usr/bin/pg_dump \"$@\" | { head -c 1048576; kill -9 $$; }\n"
    )
    (wrapper / "pg_dump").chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{wrapper}:{old_path}"
    try:
        async with running_collector(deployment.collector_toml()) as (_, port):
            config = deployment.agent_toml("db1", port, pg_source(
                postgres, f'["{bulk}"]', password_file=pw, extra="globals = false\n"))
            run = await run_agent(config)
    finally:
        os.environ["PATH"] = old_path
    assert run.returncode == ExitCode.DUMP, run.stdout + run.stderr
    assert "pg_dump was killed by SIGKILL" in log_text(deployment.agent_logs)
    assert final_files(deployment.store) == []


async def test_a_real_archive_cut_at_any_offset_is_refused(
    postgres: PostgresServer, pg_samples: list[str]
) -> None:
    """pg_dump's own output of the tricky database, cut anywhere, never passes."""
    archive = await dump_bytes(postgres, "tricky")
    whole = PgArchiveChecker()
    whole.feed(archive)
    facts = whole.finish()["pg_archive"]
    # kinds, audit, two partitions, "Sales Data"."Order", the large objects
    assert facts["data_entries"] == 6 and facts["large_objects"] == 1
    offsets = sorted({*range(0, 600), *range(0, len(archive), 13),
                      *range(len(archive) - 600, len(archive))})
    accepted = []
    for cut in offsets:
        checker = PgArchiveChecker()
        try:
            for start in range(0, cut, 997):  # fed in pieces, as the decompressor gives them
                checker.feed(archive[start:min(start + 997, cut)])
            checker.finish()
        except IntegrityError:
            continue
        accepted.append(cut)
    assert accepted == []
