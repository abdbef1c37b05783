"""Builds real deployments for tests: keys made by ssh-keygen, TOML files, a collector
running in-process on a loopback port, and the agent run as its real command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from collector.cli import serve
from collector.config import CollectorConfig, load_collector_config
from common.logsetup import setup_logging


def ssh_keygen(path: Path, comment: str = "backhaul-test") -> Path:
    """An ed25519 key pair in OpenSSH format, exactly as an administrator makes it."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


@dataclass
class Deployment:
    """Files of one collector and its agents in a temporary folder."""

    root: Path
    agents: dict[str, Path] = field(default_factory=dict)  # agent name -> private key

    def __post_init__(self) -> None:
        self.keys = self.root / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.store = self.root / "store"
        self.collector_logs = self.root / "collector-logs"
        self.agent_logs = self.root / "agent-logs"
        # The agent's records of runs and its database locks, kept out of the host's
        # /var/lib and /run, which every test run would share.
        self.agent_state = self.root / "agent-state"
        self.agent_run = self.root / "agent-run"
        self.host_key = ssh_keygen(self.keys / "collector_host_key")

    def add_agent(self, name: str) -> Path:
        key = ssh_keygen(self.keys / f"agent_{name}")
        self.agents[name] = key
        return key

    def collector_toml(
        self,
        extra: str = "",
        agent_extra: dict[str, str] | None = None,
        storage_extra: str = "",
        server_extra: str = "",
    ) -> Path:
        agent_extra = agent_extra or {}
        agents = "".join(
            textwrap.dedent(f"""
            [[agents]]
            name = "{name}"
            public_key = "{key}.pub"
            """)
            + agent_extra.get(name, "")
            for name, key in self.agents.items()
        )
        text = (
            textwrap.dedent(f"""
            [server]
            listen = "127.0.0.1:0"
            host_key = "{self.host_key}"
            {server_extra}

            [storage]
            root = "{self.store}"
            timezone = "UTC"
            {storage_extra}

            [log]
            dir = "{self.collector_logs}"
            syslog = false
        """)
            + agents
            + extra
        )
        path = self.root / "collector.toml"
        path.write_text(text)
        return path

    def agent_toml(self, name: str, port: int, sources: str, host_key: Path | None = None) -> Path:
        text = textwrap.dedent(f"""
            [agent]
            name = "{name}"
            state_dir = "{self.agent_state}"
            run_dir = "{self.agent_run}"

            [collector]
            address = "127.0.0.1:{port}"
            host_key = "{host_key or self.host_key.with_suffix(".pub")}"
            client_key = "{self.agents[name]}"
            connect_timeout = 10

            [log]
            dir = "{self.agent_logs}"
            syslog = false
        """) + textwrap.dedent(sources)
        path = self.root / f"agent-{name}.toml"
        path.write_text(text)
        return path


def mysql_source(
    port: int,
    databases: str,
    *,
    password_file: Path,
    name: str = "main",
    user: str = "root",
    extra: str = "",
) -> str:
    """A `[[sources]]` table for a MariaDB server on 127.0.0.1."""
    return (
        textwrap.dedent(f"""
        [[sources]]
        name = "{name}"
        engine = "mysql"
        host = "127.0.0.1"
        port = {port}
        user = "{user}"
        password_file = "{password_file}"
        databases = {databases}
    """)
        + extra
    )


@contextlib.asynccontextmanager
async def running_collector(config_path: Path) -> AsyncIterator[tuple[CollectorConfig, int]]:
    """Start the collector in this event loop; yields its config and bound port."""
    config = load_collector_config(config_path)
    setup_logging("backhaul-collector", config.log.dir, use_syslog=False)
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, ready=ready, stop=stop))
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the start-up error
    port = ready.result()
    try:
        yield config, port
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


class LoopbackProxy:
    """A TCP proxy on a free loopback port in front of ``target_port``.

    Each subclass says in ``_handle`` what happens to a connection (throttled, cut,
    rewritten); ``copy`` passes one direction through unchanged.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


class CuttingProxy(LoopbackProxy):
    """Passes traffic through, but cuts both sides of each connection before its
    upstream bytes pass ``limit``, while ``limit`` is set: a link that dies mid-upload,
    every time, until a test mends it with ``limit = None``."""

    def __init__(self, target_port: int, limit: int | None) -> None:
        super().__init__(target_port)
        self.limit = limit

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        sent = 0

        async def upstream() -> None:
            nonlocal sent
            while data := await reader.read(65536):
                sent += len(data)
                if self.limit is not None and sent > self.limit:
                    return
                up_writer.write(data)
                await up_writer.drain()

        down = asyncio.create_task(self.copy(up_reader, writer))
        await upstream()
        down.cancel()
        for w in (writer, up_writer):
            w.transport.abort()


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str


ROOT = Path(__file__).resolve().parents[2]


def agent_env() -> dict[str, str]:
    """The environment of the agent as a real process: this checkout on its import path."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def run_cli(*args: str, timeout: float = 300) -> AgentRun:
    """Run `backhaul-agent <args>` as a real process (its own interpreter) and wait for it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=agent_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return AgentRun(proc.returncode, out.decode(), err.decode())


async def run_agent(config: Path, *args: str, timeout: float = 300) -> AgentRun:
    """Run `backhaul-agent backup` as a real process."""
    return await run_cli("backup", "--config", str(config), *args, timeout=timeout)


def stored_files(store: Path) -> list[Path]:
    """Every file under the store, temporaries included, relative to it."""
    return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())


def final_files(store: Path) -> list[Path]:
    """The files under the store that are not upload temporaries."""
    return [p for p in stored_files(store) if not p.name.startswith(".tmp-")]


def upload_under_way(store: Path, minimum: int) -> bool:
    """Whether an upload temporary under ``store`` has reached ``minimum`` bytes."""
    for temp in store.rglob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # published or discarded meanwhile
            if temp.stat().st_size >= minimum:
                return True
    return False


def log_text(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("*.log")))
