"""Fifty agents back up at once while a hostile client floods the collector's port.

Every agent has its own listed key and drives the real agent client
(agent.link.connection.CollectorClient) through the protocol with a generated, valid zstd SQL
dump. At the same time a flood of raw TCP connections, garbage, bare SSH banners and
SSH logins with a key nobody lists hits the same port, bounded in count and in time.
Every legitimate backup must land intact and the collector must stay up and give every
connection slot back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import zstandard

from agent.config import load_agent_config
from agent.link.connection import CollectorClient
from collector.config import load_collector_config
from collector.report.outcomes import FanOut
from collector.serve.server import CollectorServer, make_context
from common.events import Begin, Data, End, Stored
from common.logsetup import setup_logging
from common.naming import encode_database
from tests.integration.harness import Deployment, log_text, stored_files

pytestmark = pytest.mark.integration

AGENTS = 50
HELD_TCP = 100  # idle connections held open (half of them after an SSH banner)
CHURN = 1000  # connect, write garbage, hang up
BAD_LOGINS = 150  # full SSH handshakes with a key nobody lists
FLOOD_CONCURRENCY = 20
TIME_LIMIT = 50.0


def sql_dump(agent: str) -> bytes:
    body = f"-- MariaDB dump 10.19  Database: {agent}\n".encode()
    body += os.urandom(96 * 1024).hex().encode()
    return bytes(
        zstandard.ZstdCompressor(level=3).compress(
            body + b"\n-- Dump completed on 2026-11-26  1:30:00\n"
        )
    )


@dataclass
class Flood:
    held: int = 0
    churned: int = 0
    refused_logins: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def collector(deployment: Deployment) -> AsyncIterator[CollectorServer]:
    path = deployment.collector_toml(server_extra="login_timeout = 20\nidle_timeout = 30")
    config = load_collector_config(path)
    setup_logging("backhaul-collector", config.log.dir, use_syslog=False)
    ctx = make_context(config, FanOut())
    ctx.store.ensure_root()
    server = CollectorServer(config, ctx)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(drain_timeout=5)


async def agent_backup(config: Path, payload: bytes) -> Stored:
    """One agent's run, on the real client: connect, one channel, one backup."""
    async with CollectorClient(load_agent_config(config)) as client:
        channel = await client.channel()
        try:
            await channel.send(
                Begin(
                    database="app",
                    engine="mysql",
                    format="sql",
                    compression="zstd",
                    started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    size_estimate=len(payload),
                    source="main",
                )
            )
            for start in range(0, len(payload), channel.max_data):
                await channel.send(Data(payload[start : start + channel.max_data]))
            await channel.send(End(len(payload), hashlib.sha256(payload).hexdigest(), {}))
            stored = await channel.expect(Stored, timeout=60)
        finally:
            channel.close()
    assert isinstance(stored, Stored)
    return stored


async def hold(port: int, flood: Flood, banner: bool, release: asyncio.Event) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    if banner:
        writer.write(b"SSH-2.0-Flood_1.0\r\n")
    flood.held += 1
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(release.wait(), TIME_LIMIT)
    writer.transport.abort()


async def churn(port: int, flood: Flood) -> None:
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(os.urandom(512))
        writer.transport.abort()
        flood.churned += 1


async def bad_login(port: int, key: asyncssh.SSHKey, n: int, flood: Flood) -> None:
    try:
        conn = await asyncssh.connect(
            "127.0.0.1",
            port,
            username=f"agent{n % AGENTS:02d}",  # a real agent's name, a stranger's key
            client_keys=[key],
            known_hosts=None,
            agent_path=None,
            config=[],
            connect_timeout=20,
        )
    except asyncssh.PermissionDenied:
        flood.refused_logins += 1
    except (asyncssh.Error, OSError) as exc:
        flood.errors.append(repr(exc))
    else:
        conn.close()
        flood.errors.append("a stranger's key was accepted")


async def run_flood(port: int, flood: Flood, release: asyncio.Event) -> list[asyncio.Task[None]]:
    """Start the held connections; run churn and bad logins a few at a time."""
    holders = [asyncio.create_task(hold(port, flood, i % 2 == 0, release)) for i in range(HELD_TCP)]
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    gate = asyncio.Semaphore(FLOOD_CONCURRENCY)

    async def limited(job: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await job

    jobs = [churn(port, flood) for _ in range(CHURN)]
    jobs += [bad_login(port, stranger, n, flood) for n in range(BAD_LOGINS)]
    await asyncio.gather(*(limited(job) for job in jobs))
    return holders


async def test_fifty_agents_back_up_intact_through_a_connection_flood(tmp_path: Path) -> None:
    """All 50 backups land with matching SHA-256; the flood is refused; no slot leaks."""
    started = time.monotonic()
    deployment = Deployment(tmp_path)
    names = [f"agent{n:02d}" for n in range(AGENTS)]
    for name in names:
        deployment.add_agent(name)
    password = tmp_path / "unused.pass"
    password.write_text("unused\n")
    payloads = {name: sql_dump(name) for name in names}
    flood = Flood()
    release = asyncio.Event()
    async with collector(deployment) as server:
        configs = {
            name: deployment.agent_toml(
                name,
                server.port,
                f"""
                [[sources]]
                name = "main"
                engine = "mysql"
                user = "backup"
                password_file = "{password}"
                databases = ["app"]
                """,
            )
            for name in names
        }
        flooding = asyncio.create_task(run_flood(server.port, flood, release))
        results = await asyncio.wait_for(
            asyncio.gather(
                *(agent_backup(configs[n], payloads[n]) for n in names), return_exceptions=True
            ),
            TIME_LIMIT,
        )
        holders = await asyncio.wait_for(flooding, TIME_LIMIT)
        release.set()
        await asyncio.gather(*holders)
        after = await agent_backup(configs[names[0]], sql_dump("after the flood"))
        for _ in range(500):  # every connection gone: every slot given back
            if server.caps.total == 0 and not server.caps.per_agent:
                break
            await asyncio.sleep(0.02)
        assert (server.caps.total, dict(server.caps.per_agent)) == (0, {})

    failures = {n: r for n, r in zip(names, results, strict=True) if not isinstance(r, Stored)}
    assert failures == {}
    for name, stored in zip(names, results, strict=True):
        assert isinstance(stored, Stored)
        path = deployment.store / name / encode_database("app") / stored.name
        data = path.read_bytes()
        assert data == payloads[name]
        assert hashlib.sha256(data).hexdigest() == stored.sha256
    assert after.name.endswith("-2.sql.zst")  # agent00 again, same day, other content
    files = stored_files(deployment.store)
    assert not [p for p in files if p.name.startswith(".tmp-")]
    assert len(files) == 2 * (AGENTS + 1)

    assert flood.errors == []
    assert (flood.held, flood.churned, flood.refused_logins) == (HELD_TCP, CHURN, BAD_LOGINS)
    assert log_text(deployment.collector_logs).count("refused login as agent") >= BAD_LOGINS
    assert time.monotonic() - started < 60
