"""MongoDB with pymongo: connection parameters, discovery, preflight and the archive dump.

The dump reads every collection as raw BSON batches (documents are never decoded or
re-encoded) and writes the ``mongodump --archive`` format (:mod:`common.mongo_archive`),
so ``mongorestore --archive --gzip`` can restore it once the caller has compressed it.
pymongo blocks, so one worker thread does all database I/O and hands bounded chunks to
the event loop through a bounded queue: memory stays bounded and a slow consumer slows
the reads down.

Every pymongo failure becomes a :class:`DumpError` whose message never holds the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, cast

from bson.binary import Binary
from bson.errors import BSONError
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.cursor import RawBatchCursor
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from common.credentials import scrub
from common.errors import BackhaulError, ConfigError, DumpError
from common.mongo_archive import (
    OPLOG_COLLECTION,
    OPLOG_DB,
    ArchiveHeader,
    ArchiveWriter,
    CollectionMetadata,
    NamespaceMetadata,
)

log = logging.getLogger(__name__)

SYSTEM_DATABASES: Final = frozenset({"admin", "local", "config"})
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
DEFAULT_BATCH_SIZE: Final = 1000
# About this many bytes of documents per cursor batch: pymongo holds several copies of a
# reply while unpacking it, so 1000 large documents (up to the server's 16 MiB per reply)
# would cost the agent far more memory than the rest of the pipeline.
DEFAULT_BATCH_BYTES: Final = 1024 * 1024
DEFAULT_QUEUE_CHUNKS: Final = 8
_AUTH_FAILED_CODES: Final = frozenset({18, 11})  # AuthenticationFailed, UserNotFound
_VERSION_RE: Final = re.compile(r"^(\d+)\.(\d+)\.(\d+)")
_USERS_AND_ROLES: Final = (
    ("$admin.system.users", "system.users", True),
    ("$admin.system.roles", "system.roles", True),
    ("$admin.system.version", "system.version", False),
)

Client = MongoClient[dict[str, Any]]


@dataclass(frozen=True)
class MongoParams:
    """How to reach a MongoDB server; the password never enters the URI or a repr.

    ``uri`` may carry hosts, a user name and options (TLS, replica set) but no password;
    ``timeout`` bounds connecting and server selection, ``socket_timeout`` one reply.
    """

    uri: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    socket_timeout: float = 300.0

    def __post_init__(self) -> None:
        scheme, sep, rest = self.uri.partition("://")
        if not sep or scheme not in ("mongodb", "mongodb+srv"):
            raise ConfigError("MongoDB URI must start with mongodb:// or mongodb+srv://")
        userinfo, at, _ = re.split(r"[/?]", rest, maxsplit=1)[0].rpartition("@")
        if at and ":" in userinfo:
            raise ConfigError("MongoDB URI must not contain a password; give it separately")
        if self.timeout <= 0 or self.socket_timeout <= 0:
            raise ConfigError("MongoDB timeouts must be positive")

    @property
    def hosts(self) -> str:
        """The host list of the URI, for messages."""
        rest = self.uri.partition("://")[2]
        return re.split(r"[/?]", rest, maxsplit=1)[0].rpartition("@")[2]


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
class _Collection:
    info: CollectionInfo
    metadata: CollectionMetadata


@dataclass(frozen=True, slots=True)
class _Plan:
    server_version: str
    replica_set: str | None
    collections: tuple[_Collection, ...]
    oplog_start: OplogPosition | None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BulkWriteError):  # its text holds whole documents; keep the first error
        errors = exc.details.get("writeErrors") or [{}]
        first = errors[0]
        return (
            f"{len(errors)} write error(s), first: {first.get('errmsg')} (code {first.get('code')})"
        )
    if isinstance(exc, OperationFailure):
        message = exc.details.get("errmsg") if exc.details else None
        return f"{message or exc} (code {exc.code})"
    return str(exc).split(", Timeout:")[0] or type(exc).__name__


@contextlib.contextmanager
def translate_errors(params: MongoParams, action: str) -> Iterator[None]:
    """Turn pymongo's exceptions into :class:`DumpError` naming ``action`` and the server."""
    try:
        yield
    except OperationFailure as exc:
        if exc.code in _AUTH_FAILED_CODES:
            who = params.username or "(no user)"
            message = f"authentication as {who!r} failed on MongoDB at {params.hosts}"
        else:
            message = f"{action} failed on MongoDB at {params.hosts}: {_describe(exc)}"
        raise DumpError(scrub(message, params.password)) from exc
    except (PyMongoError, BSONError) as exc:
        message = f"{action} failed on MongoDB at {params.hosts}: {_describe(exc)}"
        raise DumpError(scrub(message, params.password)) from exc


def connect(params: MongoParams) -> Client:
    """A client for ``params``; nothing is sent until the first operation.

    Raises :class:`ConfigError` when pymongo rejects the URI or options.
    """
    credentials: dict[str, Any] = {}
    if params.username is not None:
        credentials["username"] = params.username
    if params.password is not None:
        credentials["password"] = params.password
    millis = int(params.timeout * 1000)
    try:
        return MongoClient(
            params.uri,
            serverSelectionTimeoutMS=millis,
            connectTimeoutMS=millis,
            socketTimeoutMS=int(params.socket_timeout * 1000),
            appname="backhaul",
            connect=False,
            **credentials,
        )
    except PyMongoError as exc:
        raise ConfigError(
            scrub(f"MongoDB connection settings are invalid: {exc}", params.password)
        ) from exc


def _hello(client: Client, params: MongoParams) -> dict[str, Any]:
    """The first round trip, which also authenticates."""
    try:
        with translate_errors(params, "connecting"):
            return client.admin.command("hello")
    except BackhaulError:
        raise
    except Exception as exc:  # a server that breaks the handshake surfaces as odd exceptions
        message = f"connecting failed on MongoDB at {params.hosts}: {type(exc).__name__}"
        raise DumpError(scrub(message, params.password)) from exc


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
        _hello(client, params)
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
        plan = _make_plan(client, params, database, oplog=None)
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


def _make_plan(client: Client, params: MongoParams, database: str, oplog: bool | None) -> _Plan:
    hello = _hello(client, params)
    with translate_errors(params, f"reading the layout of {database!r}"):
        version = _server_version(client)
        replica_set = hello.get("setName")
        if oplog and replica_set is None:
            raise DumpError("a point-in-time dump needs a replica set; this server is not one")
        start = _oplog_start(client) if replica_set is not None and oplog is not False else None
        if database not in client.list_database_names():
            raise DumpError(f"database {database!r} does not exist on MongoDB at {params.hosts}")
        collections = _list_collections(client[database])
    return _Plan(version, replica_set, collections, start)


def _oplog_start(client: Client) -> OplogPosition:
    """Where the oplog window starts: the oldest open transaction, else the newest entry."""
    open_txn = client.config["transactions"].find_one(
        {"state": {"$in": ["prepared", "inProgress"]}}, sort=[("startOpTime", 1)]
    )
    if open_txn is not None:
        ts = open_txn.get("startOpTime", {}).get("ts")
        if isinstance(ts, Timestamp):
            return OplogPosition(ts.time, ts.inc)
    return _oplog_edge(client, newest=True)


def _oplog_edge(client: Client, *, newest: bool) -> OplogPosition:
    entry = client.local["oplog.rs"].find_one(
        {}, sort=[("$natural", -1 if newest else 1)], projection={"ts": 1}
    )
    ts = entry.get("ts") if entry else None
    if not isinstance(ts, Timestamp):
        raise DumpError("the oplog (local.oplog.rs) is empty or unreadable")
    return OplogPosition(ts.time, ts.inc)


def _list_collections(db: Database[dict[str, Any]]) -> tuple[_Collection, ...]:
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
) -> _Collection:
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
    return _Collection(CollectionInfo(name, kind, documents, size), metadata)


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


def batch_size_for(
    documents: int, size: int, most: int = DEFAULT_BATCH_SIZE, budget: int = DEFAULT_BATCH_BYTES
) -> int:
    """Documents per cursor batch for a collection of ``documents`` totalling ``size`` bytes.

    At most ``most``, and about ``budget`` bytes of documents of the average size; ``most``
    when the server gave no estimate.
    """
    if documents <= 0 or size <= 0:
        return most
    return max(1, min(most, budget * documents // size))


def _tool_version() -> str:
    try:
        return f"backhaul {importlib.metadata.version('backhaul')}"
    except importlib.metadata.PackageNotFoundError:
        return "backhaul"


class _Stopped(Exception):
    """The consumer went away; the worker unwinds quietly."""


class MongoDump:
    """An async iterator of uncompressed archive bytes for one database.

    ``async with MongoDump(params, "hospital") as dump: async for chunk in dump: ...``.
    Entering connects, checks the server and lists collections, views and indexes
    (:class:`DumpError` on failure). ``oplog=None`` captures the oplog window on a replica
    set, ``True`` requires it and ``False`` never captures it; :attr:`point_in_time` tells
    which happened. The oplog keeps this database's entries and ``admin.$cmd`` ones
    (transactions). Cursor batches hold at most ``batch_size`` documents and about
    ``batch_bytes`` bytes (see :func:`batch_size_for`). :attr:`metadata` is complete once
    iteration has finished.
    """

    def __init__(
        self,
        params: MongoParams,
        database: str,
        *,
        include_users_and_roles: bool = False,
        oplog: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
    ) -> None:
        if not database or database in ("local", "config"):
            raise ConfigError(f"database {database!r} cannot be dumped")
        self._params = params
        self._database = database
        self._users = include_users_and_roles
        self._oplog = oplog
        self._chunk_size = chunk_size
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._slots = threading.Semaphore(queue_chunks)
        self._stop = threading.Event()
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._plan: _Plan | None = None
        self._finished = False
        self._metadata: dict[str, Any] = {}
        self.point_in_time = False

    @property
    def metadata(self) -> dict[str, Any]:
        """Manifest facts: server version, per-collection counts and sizes, oplog window."""
        return dict(self._metadata)

    async def __aenter__(self) -> MongoDump:
        self._loop = asyncio.get_running_loop()
        try:
            self._client = await asyncio.to_thread(connect, self._params)
            client = self._client
            self._plan = await asyncio.to_thread(
                _make_plan, client, self._params, self._database, self._oplog
            )
        except BaseException:
            await self._close_client()
            raise
        self.point_in_time = self._plan.oplog_start is not None
        self._metadata = _initial_metadata(self._database, self._plan, self._users)
        self._thread = threading.Thread(target=self._work, name="mongo-dump", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive() and not self._finished:
            await self._close_client()  # interrupts a worker blocked on the network
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await self._close_client()

    def __aiter__(self) -> MongoDump:
        return self

    async def __anext__(self) -> bytes:
        if self._finished or self._thread is None:
            raise StopAsyncIteration
        item = await self._queue.get()
        self._slots.release()
        if isinstance(item, bytes):
            return item
        self._finished = True
        if item is None:
            raise StopAsyncIteration
        raise item

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    def _put(self, item: bytes | BaseException | None) -> None:
        """Hand one item to the event loop, waiting while the queue is full."""
        while not self._slots.acquire(timeout=0.2):
            if self._stop.is_set():
                raise _Stopped
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _work(self) -> None:
        try:
            _Worker(self).run()
            self._put(None)
        except _Stopped:
            return
        except BaseException as exc:  # every failure must reach the consumer
            if self._stop.is_set():
                return
            if not isinstance(exc, BackhaulError):
                log.exception("MongoDB dump of %s failed unexpectedly", self._database)
            with contextlib.suppress(_Stopped, RuntimeError):  # RuntimeError: loop closed
                self._put(exc)


def _initial_metadata(database: str, plan: _Plan, users: bool) -> dict[str, Any]:
    return {
        "database": database,
        "server_version": plan.server_version,
        "replica_set": plan.replica_set,
        "point_in_time": plan.oplog_start is not None,
        "users_and_roles": users,
        "collections": {
            c.info.name: {
                "type": c.info.type,
                "estimated_documents": c.info.documents,
                "estimated_bytes": c.info.size,
            }
            for c in plan.collections
        },
        "oplog": None,
    }


class _Worker:
    """The blocking half of :class:`MongoDump`, run on its thread."""

    def __init__(self, dump: MongoDump) -> None:
        assert dump._client is not None and dump._plan is not None
        self._dump = dump
        self._client = dump._client
        self._plan = dump._plan
        self._db = dump._database
        self._writer = ArchiveWriter()
        self._out = bytearray()

    def run(self) -> None:
        with translate_errors(self._dump._params, f"dumping {self._db!r}"):
            header = ArchiveHeader(self._plan.server_version, _tool_version())
            self._emit(self._writer.prelude(header, self._namespaces()))
            if self._dump._users:
                self._dump_users_and_roles()
            for coll in self._plan.collections:
                self._dump_collection(coll)
            if self._plan.oplog_start is not None:
                self._dump_oplog(self._plan.oplog_start)
            self._flush(final=True)
        self._finish_metadata()

    def _namespaces(self) -> list[NamespaceMetadata]:
        entries = []
        if self._dump._users:
            entries += [NamespaceMetadata(self._db, name) for name, _, _ in _USERS_AND_ROLES]
        for coll in self._plan.collections:
            info = coll.info
            meta = coll.metadata.to_json()
            entries.append(NamespaceMetadata(self._db, info.name, meta, info.size, info.type))
        if self._plan.oplog_start is not None:
            entries.append(NamespaceMetadata(OPLOG_DB, OPLOG_COLLECTION))
        return entries

    def _dump_users_and_roles(self) -> None:
        admin = self._client.admin
        for name, source, by_db in _USERS_AND_ROLES:
            query = {"db": self._db} if by_db else {}
            self._copy(self._db, name, admin[source].find_raw_batches(query))

    def _dump_collection(self, coll: _Collection) -> None:
        name = coll.info.name
        if coll.info.type == "view":
            self._emit(self._writer.end_namespace(self._db, name))
            return
        batch = batch_size_for(
            coll.info.documents, coll.info.size, self._dump._batch_size, self._dump._batch_bytes
        )
        cursor = self._client[self._db][name].find_raw_batches({}, batch_size=batch)
        self._copy(self._db, name, cursor)
        documents, size = self._writer.counts(self._db, name)
        self._dump._metadata["collections"][name].update(documents=documents, bytes=size)
        log.debug("dumped %s.%s: %d documents, %d bytes", self._db, name, documents, size)

    def _dump_oplog(self, start: OplogPosition) -> None:
        end = _oplog_edge(self._client, newest=True)
        self._check_oplog_window(start)
        window = {"$gte": Timestamp(start.t, start.i), "$lte": Timestamp(end.t, end.i)}
        mine = {"$regex": f"^{re.escape(self._db)}\\."}
        query = {"ts": window, "$or": [{"ns": mine}, {"ns": "admin.$cmd"}]}
        oplog = self._client.local["oplog.rs"]
        self._copy(OPLOG_DB, OPLOG_COLLECTION, oplog.find_raw_batches(query, batch_size=1000))
        self._check_oplog_window(start)
        entries = self._writer.counts(OPLOG_DB, OPLOG_COLLECTION)[0]
        self._dump._metadata["oplog"] = {
            "start": start.as_dict(),
            "end": end.as_dict(),
            "entries": entries,
        }

    def _check_oplog_window(self, start: OplogPosition) -> None:
        oldest = _oplog_edge(self._client, newest=False)
        if (oldest.t, oldest.i) > (start.t, start.i):
            raise DumpError(
                "the oplog rolled over during the dump; entries since the start are lost "
                "(make the oplog larger or dump at a quieter time)"
            )

    def _copy(self, db: str, coll: str, cursor: RawBatchCursor[dict[str, Any]]) -> None:
        writer, stop = self._writer, self._dump._stop
        self._emit(writer.begin_block(db, coll))
        try:
            for batch in cursor:
                if stop.is_set():
                    raise _Stopped
                self._emit(writer.documents(cast("bytes", batch)))
        finally:
            cursor.close()
        self._emit(writer.end_namespace(db, coll))

    def _emit(self, data: bytes) -> None:
        self._out += data
        if len(self._out) >= self._dump._chunk_size:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        size, out = self._dump._chunk_size, self._out
        while len(out) >= size or (final and out):
            with memoryview(out) as view:
                chunk = bytes(view[:size])
            self._dump._put(chunk)
            del out[:size]

    def _finish_metadata(self) -> None:
        meta = self._dump._metadata
        collections: Sequence[dict[str, Any]] = list(meta["collections"].values())
        meta["documents"] = sum(c.get("documents", 0) for c in collections)
        meta["document_bytes"] = sum(c.get("bytes", 0) for c in collections)
        meta["views"] = sorted(k for k, v in meta["collections"].items() if v["type"] == "view")
