"""The PostgreSQL control path: discovery, preflight checks and the facts of the manifest.

Everything here is blocking (psycopg 3); callers run it in a worker thread. psycopg's
exceptions become :class:`~common.errors.DumpError` at this one boundary, in one line
that names the server and the database but never the password (psycopg gets it as a
connection argument, in this process only).

Raises, for every public function:
    DumpError: the server is unreachable, refuses the credentials, lacks the database
        or a privilege the dump needs, or fails a query.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from agent.config import PG_GLOBALS
from agent.engines.server_params import ServerParams
from common.errors import DumpError

GLOBALS = PG_GLOBALS  # the roles and tablespaces, backed up as a database of this name
SKIPPED = frozenset({"postgres"})  # the maintenance database, empty by convention
_CONNECT_TIMEOUT = 10
_MAX_NAMES_IN_MESSAGE = 5
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class PgParams(ServerParams):
    """How to reach a PostgreSQL server; ``socket`` (a directory), when set, wins over host."""

    @property
    def server_host(self) -> str:
        """libpq's host: a path (a socket directory) or a name."""
        return self.socket or self.host


@dataclass(frozen=True)
class PgPreflight:
    """What a backup needs to know about one database before its dump starts."""

    database: str
    server_version: str
    server_major: int
    tool_major: int
    superuser: bool
    size_estimate: int
    wal_lsn: str | None
    extensions: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def discover_databases(params: PgParams) -> list[str]:
    """Every database that takes connections, except templates and ``postgres``, sorted."""
    with connect(params, "postgres") as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datallowconn "
                    "AND NOT datistemplate ORDER BY datname")
        names = [str(row[0]) for row in cur.fetchall()]
    return [name for name in names if name not in SKIPPED and name != GLOBALS]


def tool_major(tool: str) -> int:
    """The major version of a PostgreSQL client tool (``pg_dump --version``).

    Raises:
        DumpError: the tool cannot run or does not say its version.
    """
    try:
        done = subprocess.run(
            [tool, "--version"], capture_output=True, timeout=30, check=False,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DumpError(f"cannot run {tool} --version: {exc}") from None
    match = _VERSION_RE.search(done.stdout.decode("utf-8", errors="replace"))
    if done.returncode != 0 or match is None:
        raise DumpError(f"{tool} --version did not say its version")
    return int(match.group(1))


def preflight(params: PgParams, database: str, tool: str) -> PgPreflight:
    """Connect to ``database``, check what the dump with ``tool`` needs, describe it.

    Raises:
        DumpError: unreachable server, wrong credentials, unknown database, a dump tool
            older than the server, or tables and schemas the user may not read (named).
    """
    major = tool_major(tool)
    with connect(params, "postgres" if database == GLOBALS else database) as cur:
        cur.execute("SELECT current_setting('server_version'), "
                    "current_setting('server_version_num')::int / 10000, "
                    "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")
        version, server_major, superuser = cur.fetchone() or ("", 0, False)
        if major < server_major:
            raise DumpError(
                f"{tool} is version {major} but the server at {params.endpoint} runs "
                f"{server_major}: a pg_dump older than the server cannot dump it; "
                f"install the PostgreSQL {server_major} client tools"
            )
        warnings: list[str] = []
        if database == GLOBALS:
            if not superuser:
                warnings.append("not a superuser: role passwords are left out of the "
                                "globals backup (pg_dumpall --no-role-passwords)")
            return PgPreflight(database, str(version), int(server_major), major,
                               bool(superuser), 0, _wal_lsn(cur), {}, warnings)
        if not superuser:
            _check_read_access(cur, params, database)
        cur.execute("SELECT pg_database_size(current_database())")
        size = int((cur.fetchone() or (0,))[0])
        cur.execute("SELECT extname, extversion FROM pg_extension ORDER BY extname")
        extensions = {str(name): str(ver) for name, ver in cur.fetchall()}
        lsn = _wal_lsn(cur)
    return PgPreflight(database, str(version), int(server_major), major, bool(superuser),
                       size, lsn, extensions, warnings)


def _check_read_access(cur: Any, params: PgParams, database: str) -> None:
    """Without superuser or ``pg_read_all_data``, every dumped relation must be readable."""
    cur.execute("SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles "
                "WHERE rolname = 'pg_read_all_data'")
    row = cur.fetchone()
    if row is not None and row[0]:
        return
    cur.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p', 'm', 'S') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
        "AND NOT (has_schema_privilege(n.oid, 'USAGE') "
        "         AND has_table_privilege(c.oid, 'SELECT')) "
        "ORDER BY 1"
    )
    denied = [str(r[0]) for r in cur.fetchall()]
    if denied:
        raise DumpError(
            f"user {params.user!r} may not read {len(denied)} relation(s) of database "
            f"{database!r} on {params.endpoint}: {_names(denied)}; grant pg_read_all_data "
            "(PostgreSQL 14 and later) or SELECT on them and USAGE on their schemas"
        )


def _wal_lsn(cur: Any) -> str | None:
    """The WAL position now (replayed position on a standby); None when unreadable."""
    try:
        cur.execute("SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                    "ELSE pg_current_wal_lsn() END::text")
        row = cur.fetchone()
    except psycopg.Error:
        return None
    return None if row is None or row[0] is None else str(row[0])


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_MESSAGE])
    extra = len(names) - _MAX_NAMES_IN_MESSAGE
    return shown + (f" and {extra} more" if extra > 0 else "")


def connection_kwargs(params: PgParams, database: str) -> dict[str, Any]:
    """psycopg's connection arguments; no service file or ~/.pgpass is consulted."""
    return {
        "host": params.server_host,
        "port": params.port,
        "user": params.user,
        "password": params.password or "",
        "dbname": database,
        "connect_timeout": _CONNECT_TIMEOUT,
        "application_name": "backhaul",
        "passfile": "/dev/null",
        "autocommit": True,
    }


@contextlib.contextmanager
def connect(params: PgParams, database: str) -> Iterator[Any]:
    """A cursor on a fresh autocommit connection; psycopg errors become DumpError."""
    try:
        conn = psycopg.connect(**connection_kwargs(params, database))
    except psycopg.Error as exc:
        raise DumpError(_connect_message(params, database, exc)) from None
    try:
        with conn.cursor() as cur:
            yield cur
    except psycopg.Error as exc:
        raise DumpError(
            f"PostgreSQL at {params.endpoint}, database {database!r}: {_first_line(exc)}"
        ) from None
    finally:
        conn.close()


def _connect_message(params: PgParams, database: str, exc: psycopg.Error) -> str:
    text = _first_line(exc)
    lowered = str(exc).lower()
    if "does not exist" in lowered and "database" in lowered:
        return f"database {database!r} does not exist on {params.endpoint}"
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return (f"PostgreSQL at {params.endpoint} refused user {params.user!r}: wrong "
                "password or no password configured (password_file)")
    if "connection refused" in lowered or "no such file or directory" in lowered:
        return f"cannot connect to PostgreSQL at {params.endpoint}: server not running"
    return f"cannot connect to PostgreSQL at {params.endpoint}: {text}"


def _first_line(exc: BaseException) -> str:
    """The server's message without libpq's repeated prefixes, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"^.*?FATAL:\s+", "", text)
    return text.removeprefix("ERROR:").strip()
