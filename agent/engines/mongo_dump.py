"""The MongoDB archive dump: one database read with pymongo into the ``mongodump --archive``
format.

The dump reads every collection as raw BSON batches (documents are never decoded or
re-encoded) and writes the ``mongodump --archive`` format (:mod:`common.mongo_archive`),
so ``mongorestore --archive --gzip`` can restore it once the caller has compressed it.
pymongo blocks, so one worker thread does all database I/O and hands bounded chunks to
the event loop through a bounded queue: memory stays bounded and a slow consumer slows
the reads down. The connection is :mod:`agent.engines.mongo_connect`'s, the plan of what
to dump :mod:`agent.engines.mongo_inspect`'s.

Every pymongo failure becomes a :class:`DumpError` whose message never holds the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import re
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, cast

from bson.timestamp import Timestamp
from pymongo.cursor import RawBatchCursor

from agent.engines.mongo_connect import Client, MongoParams, connect, translate_errors
from agent.engines.mongo_inspect import (
    DumpPlan,
    OplogPosition,
    PlannedCollection,
    make_plan,
    oplog_edge,
)
from common.errors import BackhaulError, ConfigError, DumpError
from common.mongo_archive import (
    OPLOG_COLLECTION,
    OPLOG_DB,
    ArchiveHeader,
    ArchiveWriter,
    NamespaceMetadata,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
DEFAULT_BATCH_SIZE: Final = 1000
# About this many bytes of documents per cursor batch: pymongo holds several copies of a
# reply while unpacking it, so 1000 large documents (up to the server's 16 MiB per reply)
# would cost the agent far more memory than the rest of the pipeline.
DEFAULT_BATCH_BYTES: Final = 1024 * 1024
DEFAULT_QUEUE_CHUNKS: Final = 8
_USERS_AND_ROLES: Final = (
    ("$admin.system.users", "system.users", True),
    ("$admin.system.roles", "system.roles", True),
    ("$admin.system.version", "system.version", False),
)


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
        self._plan: DumpPlan | None = None
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
                make_plan, client, self._params, self._database, self._oplog
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


def _initial_metadata(database: str, plan: DumpPlan, users: bool) -> dict[str, Any]:
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

    def _dump_collection(self, coll: PlannedCollection) -> None:
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
        end = oplog_edge(self._client, newest=True)
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
        oldest = oplog_edge(self._client, newest=False)
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
