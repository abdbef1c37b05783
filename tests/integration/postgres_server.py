"""A throwaway PostgreSQL server in a temporary directory on loopback, for integration tests.

``initdb`` makes the cluster (SCRAM passwords for TCP and the socket alike, so a wrong
password is refused as in production); ``postgres`` runs in the foreground with its
socket in the same private directory. PostgreSQL refuses to run as root, so under root
both run as the ``postgres`` user through ``runuser``. Readiness is a successful
connection, polled, never a fixed sleep.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

_STARTUP_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_running: set[PostgresServer] = set()


class PostgresNotInstalled(RuntimeError):
    """``initdb`` or ``postgres`` is not installed."""


def find_server_bin() -> Path:
    """The newest Debian PostgreSQL server directory (``/usr/lib/postgresql/N/bin``).

    Raises:
        PostgresNotInstalled: no server package is installed.
    """
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for directory in reversed(dirs):
        if os.access(os.path.join(directory, "postgres"), os.X_OK):
            return Path(directory)
    raise PostgresNotInstalled("PostgreSQL server not found; install the postgresql package")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One ``postgres`` process with its own data directory, socket directory and port."""

    def __init__(self) -> None:
        self.bin = find_server_bin()
        self.host = "127.0.0.1"
        self.port = 0
        self.superuser = "postgres"
        self.password = secrets.token_urlsafe(18)
        self.base_dir = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
        self.datadir = self.base_dir / "data"
        self.socket_dir = str(self.base_dir)
        self.log_file = self.base_dir / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            entry = pwd.getpwnam("postgres")
            os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, socket_dir={self.socket_dir!r})"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def version(self) -> int:
        return int(self.bin.parent.name)

    def _run_as(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True)

    def _initdb(self) -> None:
        pwfile = self.base_dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_user:
            entry = pwd.getpwnam("postgres")
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        self._run_as(str(self.bin / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
                     "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                     "--locale=C.UTF-8", "--no-sync")
        pwfile.unlink()
        self._initialised = True

    def start(self) -> None:
        """Initialise once, start the server and wait until it takes connections."""
        if self.running:
            return
        if not self._initialised:
            self._initdb()
        if not self.port:
            self.port = _free_port()
        log = self.log_file.open("ab")
        self._proc = subprocess.Popen(
            [*self._as_user, str(self.bin / "postgres"), "-D", str(self.datadir),
             "-p", str(self.port), "-k", self.socket_dir, "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=50", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        _running.add(self)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {self._log_tail()}")
            try:
                with self.connect("postgres"):
                    return
            except psycopg.OperationalError:
                time.sleep(_POLL_INTERVAL)
        raise RuntimeError(f"postgres did not start in time: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None
        _running.discard(self)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def connect(self, database: str = "postgres", user: str | None = None,
                password: str | None = None) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=self.host, port=self.port, dbname=database, user=user or self.superuser,
            password=password if password is not None else self.password,
            autocommit=True, connect_timeout=5,
        )

    def execute(self, database: str, *statements: str) -> None:
        with self.connect(database) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def query(self, database: str, statement: str) -> list[tuple[Any, ...]]:
        with self.connect(database) as conn:
            return list(conn.execute(statement.encode()).fetchall())

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@atexit.register
def _stop_all() -> None:  # a crashed test run leaves no server behind
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.close()
