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


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str


async def run_agent(config: Path, *args: str, timeout: float = 300) -> AgentRun:
    """Run `backhaul-agent backup` as a real process (its own interpreter)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "backup",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return AgentRun(proc.returncode, out.decode(), err.decode())


def stored_files(store: Path) -> list[Path]:
    """Every file under the store, temporaries included, relative to it."""
    return sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())


def log_text(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("*.log")))
