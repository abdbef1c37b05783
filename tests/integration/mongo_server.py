"""A throwaway nx-27017 (MongoDB wire protocol over SQLite) server on a loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import TracebackType

import pymongo
from pymongo.errors import PyMongoError

from tests.integration import processes
from tests.integration.loopback import HOST, free_port


class NxServer:
    """One nx-27017 process with its own data directory, pid file and log file.

    nx-27017 refuses to start when its pid file names a live process, so every instance
    gets a directory of its own.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{HOST}:{self.port}/?directConnection=true"

    @property
    def log_text(self) -> str:
        logs = [self.base_dir / "nx.log", self.base_dir / "output.log"]
        return "\n".join(p.read_text(errors="replace") for p in logs if p.exists())

    def start(self, timeout: float = 20.0) -> None:
        """Start on a free port and return once the server answers ping."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = free_port()
            self._spawn()
            if self._wait_ready(timeout):
                return
            self.kill()
        raise RuntimeError(f"nx-27017 did not become ready:\n{self.log_text}")

    def stop(self) -> None:
        """Ask the server to exit (SIGTERM), then make sure it did."""
        process, self._process = self._process, None
        if process is not None:
            processes.stop(process, timeout=10)

    def kill(self) -> None:
        """End the server at once, as a crash would (SIGKILL)."""
        process, self._process = self._process, None
        if process is not None:
            processes.kill(process)

    def __enter__(self) -> NxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        command = [
            sys.executable,
            "-m",
            "nx_27017.nx_27017",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.base_dir / "data"),
            "--pid-file",
            str(self.base_dir / "nx.pid"),
            "--log-file",
            str(self.base_dir / "nx.log"),
        ]
        self._process = processes.spawn(command, self.base_dir / "output.log")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._process is not None
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )

        def answers_ping() -> bool:
            # The client's 250 ms server selection timeout paces the polling.
            try:
                client.admin.command("ping")
            except PyMongoError:
                return False
            return True

        try:
            return processes.wait_ready(self._process, answers_ping, timeout)
        finally:
            client.close()
