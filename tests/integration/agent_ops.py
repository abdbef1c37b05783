"""Helpers for the service, restore and drill tests: the agent's commands as real processes,
a bandwidth-limiting proxy, and the store."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from tests.integration.harness import LoopbackProxy, agent_env


async def start_service(config: Path, output: Path, *args: str) -> asyncio.subprocess.Process:
    """Start `backhaul-agent run` in the background, its stdout and stderr going to
    ``output`` (a pipe nobody reads could fill and stall it); see :func:`stop_service`."""
    with output.open("ab") as sink:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            *args,
            stdout=sink,
            stderr=sink,
            env=agent_env(),
        )


async def stop_service(proc: asyncio.subprocess.Process, timeout: float = 60) -> int:
    """SIGTERM, then the exit status; SIGKILL and fail if it does not stop in time."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await wait_service(proc, timeout)


async def wait_service(proc: asyncio.subprocess.Process, timeout: float = 60) -> int:
    """The exit status of a service already told to stop (a second SIGTERM would end
    its grace period); SIGKILL and fail if it does not exit in time."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


def password_file(folder: Path, password: str) -> Path:
    path = folder / "mysql.pass"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def backups(store: Path, agent: str, database: str) -> list[Path]:
    """Published backups of one database (data files with a manifest), by name."""
    folder = store / agent / database
    return sorted(
        p
        for p in folder.glob("*")
        if not p.name.startswith(".tmp-")
        and not p.name.endswith(".manifest.json")
        and Path(f"{p}.manifest.json").exists()
    )


def manifest_of(backup: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(f"{backup}.manifest.json").read_text())
    return data


def write_manifest(backup: Path, manifest: dict[str, Any]) -> None:
    path = Path(f"{backup}.manifest.json")
    path.chmod(0o640)
    path.write_text(json.dumps(manifest))


class ThrottlingProxy(LoopbackProxy):
    """A loopback TCP proxy passing at most ``rate`` bytes a second upstream."""

    def __init__(self, target_port: int, rate: int) -> None:
        super().__init__(target_port)
        self.rate = rate

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        step = max(1024, self.rate // 20)

        async def upstream() -> None:
            while data := await reader.read(step):
                up_writer.write(data)
                await up_writer.drain()
                await asyncio.sleep(len(data) / self.rate)
            up_writer.write_eof()

        try:
            await asyncio.gather(upstream(), self.copy(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
