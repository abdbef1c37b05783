"""Where a restore loads a PostgreSQL backup: ``pg_restore`` reading the custom-format
archive from stdin into a database created from ``template0``, or ``psql`` reading the
globals' SQL (roles, tablespaces) in the ``postgres`` database.

As for the other engines, nothing touches the database host's disk: the archive streams
into the tool's stdin and the password sits in a private 0600 passfile for the load's
length (:func:`agent.engines.pg_dump.passfile`). ``pg_restore`` stops at the first error
(``--exit-on-error``); objects keep their owners and grants, so a restore into a new
cluster loads the globals first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from psycopg import sql

from agent.engines.pg_dump import client_environment, credentials, find_pg_tool
from agent.engines.pg_inspect import GLOBALS, PgParams, connect
from agent.restore.mysql_schema import SchemaState
from agent.restore.sql_objects import SqlObjects
from agent.restore.targets import ClientSink, Sink
from common.errors import DumpError

log = logging.getLogger(__name__)
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1
STDERR_LINES = 3
# psql goes on after an error in the globals: a role that exists already is expected
# (the restoring user's own, or a cluster that has some of them); any other error fails.
_EXPECTED_GLOBALS_ERROR = "already exists"


class PostgresLoader:
    """Loads PostgreSQL backups with the server's own client tools."""

    engine = "postgresql"

    def __init__(self, params: PgParams) -> None:
        self.params = params

    def check_name(self, target: str) -> None:
        if not target or "\0" in target or len(target.encode("utf-8")) > MAX_NAME_BYTES:
            raise DumpError(f"{target!r} is not a valid PostgreSQL database name")

    async def check_privileges(self, target: str, objects: SqlObjects) -> None:
        """Refuse, before anything is created, a restore this account cannot finish: a
        new database needs CREATEDB, the globals CREATEROLE (a superuser has both).

        Raises:
            DumpError: the privilege is missing (named, with the statement that grants it),
                or the server cannot be asked.
        """
        await asyncio.to_thread(self._check_privileges, target)

    def _check_privileges(self, target: str) -> None:
        with connect(self.params, "postgres") as cur:
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                        "WHERE rolname = current_user")
            row = cur.fetchone()
            if target != GLOBALS:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,))
                exists = cur.fetchone() is not None
        superuser, createdb, createrole = row if row else (False, False, False)
        if superuser:
            return
        user = self.params.user or "the restoring user"
        if target == GLOBALS and not createrole:
            raise DumpError(f"restoring the globals needs CREATEROLE, which {user} lacks: "
                            f"ALTER ROLE {user} CREATEROLE (or restore as a superuser)")
        if target != GLOBALS and not exists and not createdb:
            raise DumpError(f"restoring into the new database {target!r} needs CREATEDB, which "
                            f"{user} lacks: ALTER ROLE {user} CREATEDB (or create the "
                            "database first, owned by that user)")

    async def state(self, target: str) -> SchemaState:
        if target == GLOBALS:
            return SchemaState(exists=False)
        return await asyncio.to_thread(self._state, target)

    def _state(self, target: str) -> SchemaState:
        with connect(self.params, "postgres") as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,))
            if cur.fetchone() is None:
                return SchemaState(exists=False)
        with connect(self.params, target) as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n "
                "        ON n.oid = c.relnamespace WHERE n.nspname NOT IN "
                "        ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%')"
                " + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n "
                "        ON n.oid = p.pronamespace WHERE n.nspname NOT IN "
                "        ('pg_catalog', 'information_schema'))"
            )
            row = cur.fetchone()
        return SchemaState(exists=True, objects=int(row[0]) if row else 0)

    async def prepare(self, target: str, *, replace: bool) -> None:
        if target == GLOBALS:
            return
        state = await self.state(target)
        if state.exists and not replace:
            return
        if state.exists:
            log.warning("dropping database %r to replace it with the backup", target)
            await self.drop(target)
        await asyncio.to_thread(self._execute, "CREATE DATABASE {} TEMPLATE template0", target)

    async def drop(self, target: str) -> None:
        if target == GLOBALS:
            return
        await asyncio.to_thread(self._execute, "DROP DATABASE IF EXISTS {} WITH (FORCE)", target)

    def _execute(self, statement: str, target: str) -> None:
        with connect(self.params, "postgres") as cur:
            cur.execute(sql.SQL(statement).format(sql.Identifier(target)))

    def count_tables(self, target: str) -> int:
        """Tables (and partitions) of ``target`` outside the system schemas, less those an
        extension creates (the archive has no TABLE entry for them); blocking."""
        with connect(self.params, target) as cur:
            cur.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n "
                        "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
                        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                        "AND n.nspname NOT LIKE 'pg\\_%%' AND NOT EXISTS (SELECT 1 FROM "
                        "pg_depend d WHERE d.classid = 'pg_class'::regclass "
                        "AND d.objid = c.oid AND d.deptype = 'e')")
            row = cur.fetchone()
        return int(row[0]) if row else 0

    @contextlib.asynccontextmanager
    async def load(self, target: str) -> AsyncIterator[Sink]:
        globals_ = target == GLOBALS
        tool = find_pg_tool("psql" if globals_ else "pg_restore")
        if globals_:
            args = ["--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=0",
                    "--dbname=postgres"]
        else:
            # The name as a connection string of one quoted value: never an option, never
            # parsed as host or user, whatever it holds.
            args = ["--exit-on-error", "--no-password", f"--dbname=dbname={conninfo_quote(target)}"]
        with credentials(self.params) as path:
            proc = await _start(tool, args, client_environment(self.params, None, path))
            name = Path(tool).name
            sink = (GlobalsSink if globals_ else ClientSink)(
                proc, name, target, self.params.password
            )
            try:
                yield sink
            finally:
                await sink.stop()


def conninfo_quote(value: str) -> str:
    """A libpq connection-string value in single quotes, backslash and quote escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


async def _start(tool: str, args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            tool, *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise DumpError(f"cannot start {Path(tool).name}: {exc.strerror or exc}") from exc


class GlobalsSink(ClientSink):
    """psql loading the globals: errors other than an existing role or tablespace fail."""

    async def finish(self) -> None:
        await super().finish()
        text = self.stderr_text()
        errors = [line.strip() for line in text.splitlines() if "ERROR:" in line]
        unexpected = [line for line in errors if _EXPECTED_GLOBALS_ERROR not in line]
        if unexpected:
            tail = " | ".join(unexpected[-STDERR_LINES:])
            raise DumpError(f"psql failed loading the globals: {tail}", stderr=text)
        if errors:
            log.warning("globals: %d object(s) already existed and were left as they are",
                        len(errors))


class VerifyOnlyLoader:
    """A drill's loader for the globals: the backup is fetched and proven whole twice,
    and loaded nowhere (its roles would change the server they came from)."""

    engine = "postgresql"

    def check_name(self, target: str) -> None:
        pass

    async def check_privileges(self, target: str, objects: SqlObjects) -> None:
        """Nothing is loaded, so nothing is needed."""

    async def state(self, target: str) -> SchemaState:
        return SchemaState(exists=False)

    async def prepare(self, target: str, *, replace: bool) -> None:
        pass

    async def drop(self, target: str) -> None:
        pass

    @contextlib.asynccontextmanager
    async def load(self, target: str) -> AsyncIterator[Sink]:
        yield _Discard()


class _Discard:
    async def write(self, data: bytes) -> None:
        pass

    async def finish(self) -> None:
        pass
