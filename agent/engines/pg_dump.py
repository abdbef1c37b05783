"""Streams one PostgreSQL database from ``pg_dump -Fc -Z0`` stdout, or the cluster's
globals from ``pg_dumpall --globals-only``.

The process handling (pipe, back-pressure, stderr tail, kill on early exit, the exit
status judged at the end) is :class:`~agent.engines.tool_dump.ToolDump`'s; this module
says which tool runs and how it finds its server. The password reaches the tool only
through a 0600 ``PGPASSFILE`` in a private 0700 directory (memory-backed when possible),
removed once the tool has written its first bytes and in any case when the dump ends:
never argv, never ``PGPASSWORD``, never a log line. Connection settings travel in
libpq's environment variables, so a database name such as ``-x`` or ``a=b`` is never
read as an option or a connection string. No ``HOME``: no ``~/.pgpass`` or service file
can change where the tool connects.

The custom format is written uncompressed (``-Z0``): Backhaul compresses the stream
(zstd runs in its own threads, gzip level 6 in pg_dump's one), and the collector can
then check the archive's table of contents and data blocks as they arrive.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from agent.engines.pg_inspect import GLOBALS, PgParams
from agent.engines.private_file import private_file
from agent.engines.tool_dump import ToolDump
from common.errors import DumpError

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's versioned client tools


def find_pg_tool(name: str, path: str | None = None) -> str:
    """The path of a PostgreSQL client tool: on ``path`` (default: PATH), else the newest
    of Debian's versioned directories.

    Raises:
        DumpError: not installed.
    """
    found = shutil.which(name, path=path)
    if found:
        return found
    versions = sorted(glob.glob(PG_BIN_GLOB), key=_major_of, reverse=True)
    for directory in versions:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise DumpError(f"{name} not found on PATH nor in {PG_BIN_GLOB}; install postgresql-client")


def _major_of(directory: str) -> int:
    version = Path(directory).parent.name
    return int(version) if version.isdigit() else 0


def passfile_line(params: PgParams) -> str:
    """One ``~/.pgpass`` line matching any host and database for this user.

    Raises:
        DumpError: the user or password holds a line break, which the file cannot carry.
    """
    if any(c in value for value in (params.user, params.password or "") for c in "\r\n\0"):
        raise DumpError("the user or password holds a line break; a passfile cannot carry it")

    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"*:*:*:{escape(params.user)}:{escape(params.password or '')}\n"


@contextlib.contextmanager
def passfile(params: PgParams) -> Iterator[Path]:
    """A 0600 passfile for ``params`` in a private directory removed on exit.

    Raises:
        DumpError: the file cannot be written.
    """
    text = passfile_line(params)
    with private_file(
        text, name="pgpass", prefix="backhaul-pg-", what="PostgreSQL passfile"
    ) as path:
        yield path


def client_environment(params: PgParams, database: str | None, pass_file: Path) -> dict[str, str]:
    """libpq's settings for a client tool; the password stays in ``pass_file``."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LC_ALL": "C",
        "PGHOST": params.server_host,
        "PGPORT": str(params.port),
        "PGUSER": params.user,
        "PGPASSFILE": str(pass_file),
        "PGAPPNAME": "backhaul",
        "PGCONNECT_TIMEOUT": "10",
    }
    if database is not None:
        env["PGDATABASE"] = database
    return env


def dump_arguments() -> list[str]:
    """``pg_dump``'s arguments: custom format, uncompressed (module doc), never a prompt.

    pg_dump always dumps from one snapshot in one transaction; nothing to ask for.
    """
    return ["--format=custom", "--compress=0", "--no-password"]


@contextlib.contextmanager
def _no_passfile() -> Iterator[Path]:
    yield Path(os.devnull)


def credentials(params: PgParams) -> AbstractContextManager[Path]:
    """The passfile for ``params``, or ``/dev/null`` when no password is configured (so
    no ``~/.pgpass`` is read either).

    Raises:
        DumpError: as :func:`passfile`.
    """
    return passfile(params) if params.password is not None else _no_passfile()


class PgDump(ToolDump):
    """``pg_dump`` of one database in custom format, or ``pg_dumpall --globals-only``
    when ``database`` is :data:`~agent.engines.pg_inspect.GLOBALS`.

    ``role_passwords`` False adds ``--no-role-passwords`` to the globals dump, for a
    user that may not read ``pg_authid``.
    """

    params: PgParams

    def __init__(self, params: PgParams, database: str, *, tool: str | None = None,
                 role_passwords: bool = True) -> None:
        super().__init__(params, database, tool=tool)
        self.globals = database == GLOBALS
        self.role_passwords = role_passwords

    def _default_tool(self) -> str:
        return find_pg_tool("pg_dumpall" if self.globals else "pg_dump")

    def _credentials(self) -> AbstractContextManager[Path]:
        return credentials(self.params)

    def _arguments(self, credentials: Path) -> list[str]:
        if self.globals:
            extra = [] if self.role_passwords else ["--no-role-passwords"]
            return ["--globals-only", "--no-password", "--database=postgres", *extra]
        return dump_arguments()

    def _environment(self, credentials: Path) -> dict[str, str]:
        return client_environment(self.params, None if self.globals else self.database,
                                  credentials)
