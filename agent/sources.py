"""Engine adapters: what the runner needs from a database source, whatever its engine.

Each adapter discovers databases, runs the preflight (control path, blocking calls in a
worker thread) and opens the dump stream. Passwords are read from the source's
`password_file` here, at the moment they are needed, and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.config import SourceConfig
from common.config import read_secret_file
from common.errors import ConfigError, DumpError

log = logging.getLogger(__name__)
DUMP_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Preflight:
    """Facts gathered before a dump: for progress, warnings and the manifest."""

    size_estimate: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class DumpStream(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...


class Adapter(Protocol):
    engine: str
    format: str

    async def discover(self) -> list[str]: ...
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
        from agent.mysql_control import MySQLParams

        assert source.user is not None  # enforced by the config loader
        self.source = source
        self.params = MySQLParams(
            host=source.host,
            port=source.port,
            socket=str(source.socket) if source.socket else None,
            user=source.user,
            password=_password(source),
        )

    async def discover(self) -> list[str]:
        from agent.mysql_control import discover_databases

        return await asyncio.to_thread(discover_databases, self.params)

    async def preflight(self, database: str) -> Preflight:
        from agent.mysql_control import preflight

        facts = await asyncio.to_thread(preflight, self.params, database)
        warnings: tuple[str, ...] = ()
        if facts.non_innodb_tables:
            warnings = (
                f"{len(facts.non_innodb_tables)} non-InnoDB table(s) are not covered by the "
                f"consistent snapshot: {', '.join(facts.non_innodb_tables[:10])}",
            )
        return Preflight(
            size_estimate=facts.size_estimate,
            metadata={
                "server_version": facts.server_version,
                "engine_flavor": facts.engine_flavor,
                "tables": len(facts.tables),
                "views": len(facts.views),
                "non_innodb_tables": facts.non_innodb_tables,
                "consistent_snapshot": not facts.non_innodb_tables,
                "binlog": facts.binlog,
            },
            warnings=warnings,
        )

    def dump(self, database: str) -> AbstractAsyncContextManager[DumpStream]:
        from agent.mysql_dump import MySQLDump

        return MySQLDump(self.params, database, chunk_size=DUMP_CHUNK)

    def dump_metadata(self, stream: DumpStream) -> dict[str, Any]:
        return {"tool": getattr(stream, "tool", None)}


class MongoAdapter:
    engine = "mongodb"
    format = "archive"

    def __init__(self, source: SourceConfig) -> None:
        from agent.mongo_dump import MongoParams

        assert source.uri is not None  # enforced by the config loader
        self.source = source
        self.params = MongoParams(uri=source.uri, username=source.user,
                                  password=_password(source))

    async def discover(self) -> list[str]:
        from agent.mongo_dump import discover_databases

        return await asyncio.to_thread(discover_databases, self.params)

    async def preflight(self, database: str) -> Preflight:
        from agent.mongo_dump import preflight

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
        from agent.mongo_dump import MongoDump

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


def adapter_for(source: SourceConfig) -> Adapter:
    """The adapter for a source's engine.

    Raises:
        DumpError: the password file cannot be read.
    """
    if source.engine == "mysql":
        return MySQLAdapter(source)
    return MongoAdapter(source)
