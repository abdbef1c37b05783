"""The MongoDB control path: discovery, preflight and the plan of a dump (its collections,
views and indexes, and where its oplog window starts).

Blocking (pymongo); callers run it in a worker thread. Errors are translated by
:func:`agent.engines.mongo_connect.translate_errors`.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from bson.binary import Binary
from bson.timestamp import Timestamp
from pymongo.database import Database
from pymongo.errors import OperationFailure

from agent.engines.mongo_connect import Client, MongoParams, connect, hello, translate_errors
from common.errors import DumpError
from common.mongo_archive import CollectionMetadata

SYSTEM_DATABASES: Final = frozenset({"admin", "local", "config"})
_VERSION_RE: Final = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True, slots=True)
class OplogPosition:
    """An oplog timestamp: seconds and ordinal."""

    t: int
    i: int

    def as_dict(self) -> dict[str, int]:
        return {"t": self.t, "i": self.i}


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection or view to dump, with the server's estimates."""

    name: str
    type: str
    documents: int
    size: int


@dataclass(frozen=True, slots=True)
class MongoPreflight:
    """What a dump of one database will find."""

    server_version: str
    is_replica_set: bool
    collections: tuple[CollectionInfo, ...]
    size_estimate: int
    oplog_start: OplogPosition | None


@dataclass(frozen=True, slots=True)
class PlannedCollection:
    """One collection or view of a plan, with the metadata its archive prelude carries."""

    info: CollectionInfo
    metadata: CollectionMetadata


@dataclass(frozen=True, slots=True)
class DumpPlan:
    """What a dump will read: found by :func:`make_plan` before its first byte."""

    server_version: str
    replica_set: str | None
    collections: tuple[PlannedCollection, ...]
    oplog_start: OplogPosition | None


def _server_version(client: Client) -> str:
    version = str(client.admin.command("buildInfo").get("version", ""))
    match = _VERSION_RE.match(version)
    if match is None:
        raise DumpError(f"MongoDB reported an unparseable version {version!r}")
    return match.group(0)


def discover_databases(params: MongoParams) -> list[str]:
    """Every database except admin, local and config, sorted; what "all" means.

    Raises :class:`DumpError` when the server is unreachable or refuses.
    """
    client = connect(params)
    try:
        hello(client, params)
        with translate_errors(params, "listing databases"):
            names = client.list_database_names()
    finally:
        client.close()
    return sorted(name for name in names if name not in SYSTEM_DATABASES)


def preflight(params: MongoParams, database: str) -> MongoPreflight:
    """Check a database can be dumped and estimate its size.

    Raises :class:`DumpError` when the server is down, authentication fails or the
    database holds something the archive cannot carry (time-series collections).
    """
    client = connect(params)
    try:
        plan = make_plan(client, params, database, oplog=None)
    finally:
        client.close()
    infos = tuple(c.info for c in plan.collections)
    return MongoPreflight(
        server_version=plan.server_version,
        is_replica_set=plan.replica_set is not None,
        collections=infos,
        size_estimate=sum(info.size for info in infos),
        oplog_start=plan.oplog_start,
    )


def make_plan(client: Client, params: MongoParams, database: str, oplog: bool | None) -> DumpPlan:
    """The collections, views and indexes of ``database``, and where the oplog window
    starts (``oplog``: None on a replica set only, True required, False never).

    Raises :class:`DumpError` as :func:`preflight`.
    """
    reply = hello(client, params)
    with translate_errors(params, f"reading the layout of {database!r}"):
        version = _server_version(client)
        replica_set = reply.get("setName")
        if oplog and replica_set is None:
            raise DumpError("a point-in-time dump needs a replica set; this server is not one")
        start = _oplog_start(client) if replica_set is not None and oplog is not False else None
        if database not in client.list_database_names():
            raise DumpError(f"database {database!r} does not exist on MongoDB at {params.hosts}")
        collections = _list_collections(client[database])
    return DumpPlan(version, replica_set, collections, start)


def _oplog_start(client: Client) -> OplogPosition:
    """Where the oplog window starts: the oldest open transaction, else the newest entry."""
    open_txn = client.config["transactions"].find_one(
        {"state": {"$in": ["prepared", "inProgress"]}}, sort=[("startOpTime", 1)]
    )
    if open_txn is not None:
        ts = open_txn.get("startOpTime", {}).get("ts")
        if isinstance(ts, Timestamp):
            return OplogPosition(ts.time, ts.inc)
    return oplog_edge(client, newest=True)


def oplog_edge(client: Client, *, newest: bool) -> OplogPosition:
    """The newest (or oldest) entry's position in the oplog."""
    entry = client.local["oplog.rs"].find_one(
        {}, sort=[("$natural", -1 if newest else 1)], projection={"ts": 1}
    )
    ts = entry.get("ts") if entry else None
    if not isinstance(ts, Timestamp):
        raise DumpError("the oplog (local.oplog.rs) is empty or unreadable")
    return OplogPosition(ts.time, ts.inc)


def _list_collections(db: Database[dict[str, Any]]) -> tuple[PlannedCollection, ...]:
    found = []
    for spec in sorted(db.list_collections(), key=lambda s: str(s.get("name"))):
        name, kind = str(spec.get("name")), str(spec.get("type", "collection"))
        if "$" in name or (name.startswith("system.") and name != "system.js"):
            continue
        if kind == "timeseries":
            raise DumpError(f"time-series collection {db.name}.{name} cannot be dumped yet")
        if kind not in ("collection", "view"):
            raise DumpError(f"{db.name}.{name} is of unknown type {kind!r}")
        found.append(_describe_collection(db, spec, name, kind))
    return tuple(found)


def _describe_collection(
    db: Database[dict[str, Any]], spec: Mapping[str, Any], name: str, kind: str
) -> PlannedCollection:
    indexes: list[dict[str, Any]] = []
    documents = size = 0
    if kind == "collection":
        indexes = [dict(index) for index in db[name].list_indexes()]
        documents, size = _estimate(db, name)
    metadata = CollectionMetadata(
        options=dict(spec.get("options") or {}),
        indexes=indexes,
        uuid=_uuid_hex(spec.get("info", {}).get("uuid")),
        collection_name=name,
        type=kind,
    )
    return PlannedCollection(CollectionInfo(name, kind, documents, size), metadata)


def _estimate(db: Database[dict[str, Any]], name: str) -> tuple[int, int]:
    try:
        stats = db.command("collStats", name)
        return int(stats.get("count", 0)), int(stats.get("size", 0))
    except OperationFailure:
        return db[name].estimated_document_count(), 0


def _uuid_hex(value: object) -> str:
    """The collection UUID as mongodump writes it; empty when there is no real one."""
    found = None
    if isinstance(value, uuid.UUID):
        found = value
    elif isinstance(value, Binary) and len(value) == 16:
        found = uuid.UUID(bytes=bytes(value))
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            found = uuid.UUID(value)
    return found.hex if found is not None and found.int else ""
