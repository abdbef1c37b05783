"""A throwaway MariaDB server in a temporary directory on loopback, for integration tests.

The server is initialised with ``mariadb-install-db`` and run with ``--no-defaults`` so
nothing from ``/etc/mysql`` leaks in. Readiness is detected by polling a connection over
the Unix socket, never by sleeping for a fixed time. Binary logging is on by default so
binlog positions can be tested.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pymysql

from tests.integration import processes
from tests.integration.loopback import free_port

_STARTUP_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 5
_ER_ACCESS_DENIED = 1045
# A Unix socket path must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100

_running: set[MariaDBServer] = set()


class MariaDBNotInstalled(RuntimeError):
    """``mariadbd`` or ``mariadb-install-db`` is not on PATH (or in /usr/sbin)."""


class MariaDBStartupError(RuntimeError):
    """The server did not come up; the message carries the tail of its error log."""


def find_server_binaries() -> tuple[str, str]:
    """Return the paths of ``mariadbd`` and ``mariadb-install-db``.

    Raises:
        MariaDBNotInstalled: either program is missing.
    """
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/local/sbin"])
    server = shutil.which("mariadbd", path=search) or shutil.which("mysqld", path=search)
    install = shutil.which("mariadb-install-db", path=search) or shutil.which(
        "mysql_install_db", path=search
    )
    if server is None or install is None:
        raise MariaDBNotInstalled(
            "MariaDB server binaries not found (need mariadbd and mariadb-install-db on PATH "
            "or in /usr/sbin); install the mariadb-server package"
        )
    return server, install


def _base_tempdir() -> str:
    base = tempfile.gettempdir()
    # Leave room for "/mariadb-XXXXXXXX/mysql.sock" inside the socket path limit.
    return base if len(base) < _MAX_SOCKET_PATH - 40 else "/tmp"


def _sql_literal(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


class MariaDBServer:
    """One ``mariadbd`` process with its own data directory, socket and TCP port.

    Use ``start()``/``stop()`` (or ``with MariaDBServer() as server:``) and ``close()``
    to remove the temporary directory. ``kill()`` sends SIGKILL for crash tests and
    ``restart()`` starts the same data directory again.
    """

    def __init__(self, *, log_bin: bool = True, extra_args: Sequence[str] = ()) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.root_user = "root"
        self.root_password = secrets.token_urlsafe(18)
        self.log_bin = log_bin
        self._extra_args = list(extra_args)
        self._server_bin, self._install_bin = find_server_binaries()
        self.base_dir = Path(tempfile.mkdtemp(prefix="mariadb-", dir=_base_tempdir()))
        self.datadir = self.base_dir / "data"
        self.socket = str(self.base_dir / "mysql.sock")
        self.error_log = self.base_dir / "error.log"
        self.defaults_file = self.base_dir / "client.cnf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False

    def __repr__(self) -> str:
        return f"MariaDBServer(host={self.host!r}, port={self.port}, socket={self.socket!r})"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> None:
        """Initialise the data directory once, start the server and wait until it answers."""
        if self.running:
            return
        if not self._initialised:
            self._install()
        keep_port = self.port != 0
        for attempt in range(_PORT_ATTEMPTS):
            if not keep_port or attempt > 0:
                self.port = free_port()
            try:
                self._launch()
                return
            except MariaDBStartupError as exc:
                if "already in use" not in str(exc) and "Address in use" not in str(exc):
                    raise
        raise MariaDBStartupError(f"no free port for mariadbd after {_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait for a clean shutdown, then SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        processes.stop(proc, timeout=_STOP_TIMEOUT)
        self._proc = None
        _running.discard(self)

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash, as far as clients can tell) and reap it."""
        proc = self._proc
        if proc is None:
            return
        processes.kill(proc)
        self._proc = None
        _running.discard(self)

    def restart(self) -> None:
        """Stop (if running) and start again on the same data directory and port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temporary directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> MariaDBServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _root_args(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def _install(self) -> None:
        bootstrap = self.base_dir / "bootstrap.sql"
        password = _sql_literal(self.root_password)
        set_password = (
            "UPDATE mysql.global_priv SET Priv = JSON_SET(Priv, '$.plugin', "  # noqa: S608 - literal
            "'mysql_native_password', '$.authentication_string', "
            f"PASSWORD({password})) WHERE User = 'root';\n"
        )
        statements = [
            "DELETE FROM mysql.global_priv WHERE User = 'root' "
            "AND Host NOT IN ('localhost', '127.0.0.1', '::1');\n",
            "DELETE FROM mysql.proxies_priv WHERE Host NOT IN ('localhost', '127.0.0.1', '::1');\n",
            set_password,
        ]
        bootstrap.write_text("".join(statements), encoding="utf-8")
        bootstrap.chmod(0o600)
        cmd = [
            self._install_bin,
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            f"--extra-file={bootstrap}",
            *self._root_args(),
        ]
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False
        )
        bootstrap.unlink()
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).decode(errors="replace")[-4000:]
            raise MariaDBStartupError(
                f"mariadb-install-db failed with status {result.returncode}:\n{tail}"
            )
        self._write_defaults_file()
        self._initialised = True

    def _write_defaults_file(self) -> None:
        fd = os.open(self.defaults_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(
                "[client]\n"
                f"user={self.root_user}\n"
                f'password="{self.root_password}"\n'
                f"socket={self.socket}\n"
                "protocol=socket\n"
            )

    def _server_command(self) -> list[str]:
        cmd = [
            self._server_bin,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            f"--pid-file={self.base_dir / 'mariadbd.pid'}",
            f"--log-error={self.error_log}",
            f"--tmpdir={self.base_dir}",
            "--innodb-buffer-pool-size=64M",
            # Throwaway data: trade durability for speed.
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--sync-binlog=0",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            "--max-allowed-packet=64M",
            "--event-scheduler=OFF",
            "--server-id=1",
            *self._root_args(),
        ]
        if self.log_bin:
            cmd += [f"--log-bin={self.datadir / 'binlog'}", "--binlog-format=MIXED"]
        else:
            cmd.append("--skip-log-bin")
        return cmd + self._extra_args

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket).unlink()
        log_offset = self.error_log.stat().st_size if self.error_log.exists() else 0
        self._proc = subprocess.Popen(
            self._server_command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _running.add(self)
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            status = self._proc.poll()
            if status is not None:
                raise MariaDBStartupError(
                    f"mariadbd exited with status {status} during start-up:\n"
                    f"{self._log_tail(log_offset)}"
                )
            if Path(self.socket).exists():
                try:
                    self.connect(connect_timeout=2).close()
                    return
                except pymysql.err.OperationalError as exc:
                    if exc.args and exc.args[0] == _ER_ACCESS_DENIED:
                        raise MariaDBStartupError(f"mariadbd refused root: {exc}") from exc
            if time.monotonic() > deadline:
                raise MariaDBStartupError(
                    f"mariadbd not ready after {_STARTUP_TIMEOUT:.0f}s:\n"
                    f"{self._log_tail(log_offset)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _log_tail(self, offset: int) -> str:
        try:
            with self.error_log.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no error log)"

    # -- SQL helpers -----------------------------------------------------------------------

    def connect(self, database: str | None = None, *, connect_timeout: int = 10) -> Any:
        """A new pymysql connection as root over the Unix socket (autocommit on)."""
        return pymysql.connect(
            unix_socket=self.socket,
            user=self.root_user,
            password=self.root_password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=connect_timeout,
        )

    @contextlib.contextmanager
    def connection(self, database: str | None = None) -> Iterator[Any]:
        conn = self.connect(database)
        try:
            yield conn
        finally:
            conn.close()

    def execute(self, sql: str, database: str | None = None, args: Any = None) -> int:
        """Run one statement; returns the affected row count."""
        with self.connection(database) as conn, conn.cursor() as cur:
            affected: int = cur.execute(sql, args)
            return affected

    def query(
        self, sql: str, database: str | None = None, args: Any = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement and return all rows."""
        with self.connection(database) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def create_user(
        self,
        name: str,
        password: str,
        grants: str | Sequence[str] = "ALL PRIVILEGES ON *.*",
    ) -> None:
        """Create ``name@'%'`` with ``password`` and grant each of ``grants``.

        ``grants`` is the part between GRANT and TO, e.g. ``"SELECT ON `db`.*"``.
        """
        grant_list = [grants] if isinstance(grants, str) else list(grants)
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@'%%'", (name,))
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (name, password))
            for grant in grant_list:
                cur.execute(f"GRANT {grant} TO %s@'%%'", (name,))

    def create_database(self, name: str) -> None:
        """Drop and create database ``name`` (utf8mb4)."""
        quoted = quote_identifier(name)
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {quoted}")
            cur.execute(f"CREATE DATABASE {quoted} CHARACTER SET utf8mb4")


def quote_identifier(name: str) -> str:
    """Quote a MySQL identifier with backticks."""
    return "`" + name.replace("`", "``") + "`"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.kill()
