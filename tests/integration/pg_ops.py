"""Helpers for the PostgreSQL tests: the agent's `[[sources]]` table, stock-tool runs."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

from tests.integration.postgres_server import PostgresServer


def pg_source(
    server: PostgresServer,
    databases: str,
    *,
    password_file: Path,
    name: str = "pg",
    user: str = "postgres",
    extra: str = "",
) -> str:
    """A `[[sources]]` table for a PostgreSQL server on 127.0.0.1."""
    return textwrap.dedent(f"""
        [[sources]]
        name = "{name}"
        engine = "postgresql"
        host = "127.0.0.1"
        port = {server.port}
        user = "{user}"
        password_file = "{password_file}"
        databases = {databases}
    """) + extra


def stock_env(server: PostgresServer) -> dict[str, str]:
    """What an administrator's shell would set to run psql/pg_restore by hand."""
    return {"PATH": "/usr/bin:/bin", "PGPASSWORD": server.password, "PGHOST": server.host,
            "PGPORT": str(server.port), "PGUSER": server.superuser}


async def run_tool(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None
                   ) -> tuple[int, bytes, bytes]:
    """Run a command with ``stdin``; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out, err
