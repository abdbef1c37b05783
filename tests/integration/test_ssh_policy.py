"""The collector is an SSH server that offers the backhaul subsystem and nothing else.

Every test logs in with a real, listed agent key: even a legitimate agent gets no
shell, no command, no file transfer and no forwarding of any kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from tests.integration.harness import Deployment, running_collector

pytestmark = pytest.mark.integration


@pytest.fixture
async def agent_conn(tmp_path: Path) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, int]]:
    deployment = Deployment(tmp_path)
    key = deployment.add_agent("db1")
    config = deployment.collector_toml(server_extra="login_timeout = 2\nidle_timeout = 2")
    async with running_collector(config) as (_, port):
        conn = await asyncssh.connect(
            "127.0.0.1", port, username="db1", client_keys=[str(key)],
            known_hosts=([asyncssh.read_public_key(f"{deployment.host_key}.pub")], [], []),
            agent_path=None, config=[],
        )
        async with conn:
            yield conn, port


async def test_exec_is_refused(agent_conn: tuple[asyncssh.SSHClientConnection, int]) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.run("id", check=False)


async def test_shell_is_refused(agent_conn: tuple[asyncssh.SSHClientConnection, int]) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.create_process()


async def test_pty_is_refused(agent_conn: tuple[asyncssh.SSHClientConnection, int]) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
        await conn.create_process(term_type="xterm", subsystem="backhaul")


async def test_sftp_is_refused(agent_conn: tuple[asyncssh.SSHClientConnection, int]) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.start_sftp_client()


async def test_scp_is_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int], tmp_path: Path
) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError):
        await asyncssh.scp((conn, "/etc/passwd"), str(tmp_path / "stolen"))
    assert not (tmp_path / "stolen").exists()


async def test_other_subsystems_are_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    conn, _ = agent_conn
    for name in ("sftp", "netconf", "backhaul2"):
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process(subsystem=name)


async def test_local_port_forwarding_is_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    """direct-tcpip to anything, even the collector itself, is refused."""
    conn, port = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_connection("127.0.0.1", port)
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.open_unix_connection("/run/mysqld/mysqld.sock")


async def test_remote_port_forwarding_is_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelListenError):
        await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)


async def test_x11_forwarding_is_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    conn, _ = agent_conn
    with pytest.raises(asyncssh.ChannelOpenError, match="X11"):
        await conn.create_process(subsystem="backhaul", x11_forwarding=True,
                                  x11_display="127.0.0.1:0")


async def test_agent_forwarding_is_refused(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    conn, _ = agent_conn
    chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="backhaul",
                                        encoding=None)
    # No public client API sends this request without a local agent; the request
    # itself is what the server must refuse.
    assert await chan._make_request(b"auth-agent-req@openssh.com") is False
    chan.close()


async def test_idle_channel_is_closed_after_the_idle_timeout(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    """A channel that says nothing is closed by the collector, not held open."""
    conn, _ = agent_conn
    _, reader, _ = await conn.open_session(subsystem="backhaul", encoding=None)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    assert 1.5 < loop.time() - start < 8


async def test_unauthenticated_connection_is_dropped_after_the_login_timeout(
    agent_conn: tuple[asyncssh.SSHClientConnection, int],
) -> None:
    """A TCP client that never authenticates is disconnected."""
    _, port = agent_conn
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(15):
        while await reader.read(4096):
            pass
    writer.close()
    assert 1.5 < loop.time() - start < 10
