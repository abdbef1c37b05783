"""Engine adapters: what the runner needs from a database source, whatever its engine.

Each adapter discovers databases, runs the preflight (control path, blocking calls in a
worker thread) and opens the dump stream. Passwords are read from the source's
`password_file` here, at the moment they are needed, and never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import SourceConfig
from agent.stream.compress_thread import PipeDump
from common.credentials import read_secret_file
from common.errors import ConfigError, DumpError

if TYPE_CHECKING:
    from agent.engines.mysql_connect import MySQLParams
    from agent.engines.mysql_dump import MySQLDump
    from agent.stream.pipe import PipeReader

log = logging.getLogger(__name__)
CHECKSUMS_BUDGET = 20_000  # JSON bytes; END's metadata is capped at 32 KiB in all


@dataclass(frozen=True)
class Preflight:
    """Facts gathered before a dump: for progress, warnings and the manifest."""

    size_estimate: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


# A dump tool's stdout pipe (MySQL, PostgreSQL), read by the pump; or chunks made in
# Python (MongoDB).
DumpStream = PipeDump | AsyncIterable[bytes]


class Adapter(Protocol):
    engine: str
    format: str

    async def discover(self) -> list[str]: ...
    def format_for(self, database: str) -> str: ...
    async def preflight(self, database: str) -> Preflight: ...
    def dump(self, database: str) -> AbstractAsyncContextManager[DumpStream]: ...
    def dump_metadata(self, stream: DumpStream) -> dict[str, Any]: ...


def _password(source: SourceConfig) -> str | None:
    if source.password_file is None:
        return None
    try:
        return read_secret_file(source.password_file, f"source {source.name}")
    except ConfigError as exc:
        raise DumpError(str(exc)) from None


class MySQLAdapter:
    engine = "mysql"
    format = "sql"

    def __init__(self, source: SourceConfig) -> None:
        from agent.engines.mysql_connect import MySQLParams

        assert source.user is not None  # enforced by the config loader
        self.source = source
        self._binlog_before: dict[str, dict[str, Any] | None] = {}
        self.params = MySQLParams(
            host=source.host,
            port=source.port,
            socket=str(source.socket) if source.socket else None,
            user=source.user,
            password=_password(source),
        )

    async def discover(self) -> list[str]:
        from agent.engines.mysql_inspect import discover_databases

        return await asyncio.to_thread(discover_databases, self.params)

    def format_for(self, database: str) -> str:
        return self.format

    async def preflight(self, database: str) -> Preflight:
        from agent.engines.mysql_inspect import preflight

        facts = await asyncio.to_thread(preflight, self.params, database)
        warnings: tuple[str, ...] = ()
        if facts.non_innodb_tables:
            warnings = (
                f"{len(facts.non_innodb_tables)} non-InnoDB table(s) are not covered by the "
                f"consistent snapshot: {', '.join(facts.non_innodb_tables[:10])}",
            )
        metadata: dict[str, Any] = {
            "server_version": facts.server_version,
            "engine_flavor": facts.engine_flavor,
            "tables": len(facts.tables),
            "views": len(facts.views),
            "non_innodb_tables": facts.non_innodb_tables,
            "consistent_snapshot": not facts.non_innodb_tables,
            "binlog": facts.binlog,
        }
        if self.source.record_checksums:
            metadata.update(await self._checksums(database))
        self._binlog_before[database] = facts.binlog
        return Preflight(size_estimate=facts.size_estimate, metadata=metadata, warnings=warnings)

    async def _checksums(self, database: str) -> dict[str, Any]:
        """Row counts and CHECKSUM TABLE of every table, for restore drills to compare.

        They are read just before the dump, outside its snapshot. ``binlog_unchanged`` in
        the dump metadata says whether the server logged any write between the binlog
        position read before them and the one read after the dump: only then are they
        known to describe exactly what the dump holds.
        """
        from agent.engines.mysql_inspect import table_checksums

        values = await asyncio.to_thread(table_checksums, self.params, database)
        tables = {name: [v["rows"], v["checksum"]] for name, v in values.items()}
        if len(json.dumps(tables)) > CHECKSUMS_BUDGET:
            return {"checksums": None,
                    "checksums_skipped": f"{len(tables)} tables: too many to record"}
        return {"checksums": {"taken": "before_dump", "fields": ["rows", "checksum"],
                              "tables": tables}}

    def dump(self, database: str) -> AbstractAsyncContextManager[DumpStream]:
        from agent.engines.mysql_dump import MySQLDump

        return _BinlogWatch(MySQLDump(self.params, database),
                            self.params, self._binlog_before.pop(database, None))

    def dump_metadata(self, stream: DumpStream) -> dict[str, Any]:
        meta: dict[str, Any] = {"tool": getattr(stream, "tool", None)}
        if isinstance(stream, _BinlogWatch) and stream.after_read:
            meta["binlog_after"] = stream.after
            meta["binlog_unchanged"] = (
                None if stream.before is None or stream.after is None
                else stream.before == stream.after
            )
        return meta


class _BinlogWatch:
    """A MySQL dump that reads the binlog position again once the dump has ended.

    Read in :meth:`finish`, once the dump tool has ended well; equal positions before
    and after mean the server logged no write meanwhile.
    """

    def __init__(self, dump: MySQLDump, params: MySQLParams,
                 before: dict[str, Any] | None) -> None:
        self._dump = dump
        self._params = params
        self.before = before
        self.after: dict[str, Any] | None = None
        self.after_read = False

    @property
    def tool(self) -> str | None:
        return self._dump.tool

    async def __aenter__(self) -> _BinlogWatch:
        await self._dump.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._dump.__aexit__(exc_type, exc, tb)

    def pipe_reader(self) -> PipeReader:
        return self._dump.pipe_reader()

    def note_read(self, count: int) -> None:
        self._dump.note_read(count)

    async def finish(self) -> None:
        await self._dump.finish()
        from agent.restore.mysql_schema import binlog_position

        try:
            self.after = await asyncio.to_thread(binlog_position, self._params)
        except DumpError as exc:  # the dump itself succeeded; only the comparison is lost
            log.warning("binlog position after the dump not read: %s", exc)
        self.after_read = True


class MongoAdapter:
    engine = "mongodb"
    format = "archive"

    def __init__(self, source: SourceConfig) -> None:
        from agent.engines.mongo_connect import MongoParams

        assert source.uri is not None  # enforced by the config loader
        self.source = source
        self.params = MongoParams(uri=source.uri, username=source.user,
                                  password=_password(source))

    async def discover(self) -> list[str]:
        from agent.engines.mongo_inspect import discover_databases

        return await asyncio.to_thread(discover_databases, self.params)

    def format_for(self, database: str) -> str:
        return self.format

    async def preflight(self, database: str) -> Preflight:
        from agent.engines.mongo_inspect import preflight

        facts = await asyncio.to_thread(preflight, self.params, database)
        warnings: tuple[str, ...] = () if facts.is_replica_set else (
            "standalone server: the dump is not a point-in-time snapshot",
        )
        return Preflight(
            size_estimate=facts.size_estimate,
            metadata={
                "server_version": facts.server_version,
                "replica_set": facts.is_replica_set,
            },
            warnings=warnings,
        )

    def dump(self, database: str) -> AbstractAsyncContextManager[DumpStream]:
        from agent.engines.mongo_dump import MongoDump

        oplog = self.source.extra.get("oplog")
        users = bool(self.source.extra.get("include_users_and_roles", False))
        stream: AbstractAsyncContextManager[DumpStream] = MongoDump(
            self.params, database, include_users_and_roles=users,
            oplog=oplog if isinstance(oplog, bool) else None,
        )
        return stream

    def dump_metadata(self, stream: DumpStream) -> dict[str, Any]:
        meta = dict(getattr(stream, "metadata", {}) or {})
        meta["point_in_time"] = bool(getattr(stream, "point_in_time", False))
        return meta


class PostgresAdapter:
    """``pg_dump`` custom-format archives, one per database, and the cluster's globals
    (roles, tablespaces) as plain SQL under the name :data:`agent.config.PG_GLOBALS`."""

    engine = "postgresql"
    format = "pgdump"
    globals_format = "pgsql"

    def __init__(self, source: SourceConfig) -> None:
        from agent.engines.pg_inspect import PgParams

        assert source.user is not None  # enforced by the config loader
        self.source = source
        self.with_globals = bool(source.extra.get("globals", True))
        self._superuser: dict[str, bool] = {}
        self.params = PgParams(
            host=source.host,
            port=source.port,
            socket=str(source.socket) if source.socket else None,
            user=source.user,
            password=_password(source),
        )

    def format_for(self, database: str) -> str:
        from agent.engines.pg_inspect import GLOBALS

        return self.globals_format if database == GLOBALS else self.format

    async def discover(self) -> list[str]:
        from agent.engines.pg_inspect import GLOBALS, discover_databases

        names = await asyncio.to_thread(discover_databases, self.params)
        return [GLOBALS, *names] if self.with_globals else names

    async def preflight(self, database: str) -> Preflight:
        from agent.engines.pg_dump import find_pg_tool
        from agent.engines.pg_inspect import GLOBALS, preflight

        tool = find_pg_tool("pg_dumpall" if database == GLOBALS else "pg_dump")
        facts = await asyncio.to_thread(preflight, self.params, database, tool)
        self._superuser[database] = facts.superuser
        metadata: dict[str, Any] = {
            "server_version": facts.server_version,
            "tool_major": facts.tool_major,
            "wal_lsn_before_dump": facts.wal_lsn,
        }
        if database != GLOBALS:
            metadata["extensions"] = facts.extensions
        return Preflight(size_estimate=facts.size_estimate or None, metadata=metadata,
                         warnings=tuple(facts.warnings))

    def dump(self, database: str) -> AbstractAsyncContextManager[DumpStream]:
        from agent.engines.pg_dump import PgDump

        stream: AbstractAsyncContextManager[DumpStream] = PgDump(
            self.params, database,
            # get, not pop: a dump stopped to wait for the collector starts again.
            role_passwords=self._superuser.get(database, True),
        )
        return stream

    def dump_metadata(self, stream: DumpStream) -> dict[str, Any]:
        return {"tool": getattr(stream, "tool", None)}


def adapter_for(source: SourceConfig) -> Adapter:
    """The adapter for a source's engine.

    Raises:
        DumpError: the password file cannot be read.
    """
    if source.engine == "mysql":
        return MySQLAdapter(source)
    if source.engine == "postgresql":
        return PostgresAdapter(source)
    return MongoAdapter(source)
