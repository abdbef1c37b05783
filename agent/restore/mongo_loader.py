"""Restore a ``mongodump --archive`` stream with pymongo alone, no MongoDB tools.

Collections are created with their options first, documents are inserted as raw BSON in
batches, indexes are built once a collection's data is in, and views come last. Every
namespace's CRC is checked as its EOF block arrives and the restore stops at the first
mismatch. Because the archive streams, a restore that fails part-way leaves the target
partly written: restore into a fresh database (``target_db``) and switch over afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from bson.raw_bson import RawBSONDocument

from agent.engines.mongo_connect import Client, MongoParams, connect, translate_errors
from common.errors import ConfigError, DumpError, IntegrityError
from common.mongo_archive import (
    OPLOG_COLLECTION,
    OPLOG_DB,
    ArchiveReader,
    CollectionMetadata,
    Document,
    NamespaceEnd,
    NamespaceMetadata,
    Prelude,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH_DOCUMENTS: Final = 1000
DEFAULT_BATCH_BYTES: Final = 8 * 1024 * 1024
_CREATE_OPTIONS_DROPPED: Final = frozenset({"flags", "autoIndexId"})  # refused by servers


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore wrote, by target namespace."""

    databases: dict[str, str]
    collections: dict[str, int]
    views: tuple[str, ...]
    indexes: int
    documents: int
    document_bytes: int
    skipped: tuple[str, ...]


@dataclass(slots=True)
class _Target:
    db: str
    name: str
    metadata: CollectionMetadata
    is_view: bool
    pending: list[RawBSONDocument] = field(default_factory=list)
    pending_bytes: int = 0
    documents: int = 0

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.name}"


def restore_archive(
    params: MongoParams,
    stream: Iterable[bytes],
    target_db: str | None = None,
    drop: bool = False,
    *,
    batch_documents: int = DEFAULT_BATCH_DOCUMENTS,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> RestoreResult:
    """Restore an uncompressed archive stream into MongoDB.

    ``target_db`` renames the (single) database of the archive. Collections that already
    exist are refused unless ``drop`` is true, in which case those collections alone are
    dropped first. The oplog and users/roles namespaces are not replayed; they are listed
    in :attr:`RestoreResult.skipped`.

    Raises :class:`IntegrityError` for a truncated or corrupt archive (CRC mismatch),
    :class:`DumpError` when the server refuses or fails, and :class:`ConfigError` when
    ``target_db`` cannot apply to the archive.
    """
    client = connect(params)
    try:
        restorer = _Restorer(client, params, target_db, drop, batch_documents, batch_bytes)
        reader = ArchiveReader()
        for chunk in stream:
            for event in reader.feed(chunk):
                restorer.handle(event)
        reader.close()
        return restorer.finish()
    finally:
        client.close()


class _Restorer:
    def __init__(
        self,
        client: Client,
        params: MongoParams,
        target_db: str | None,
        drop: bool,
        batch_documents: int,
        batch_bytes: int,
    ) -> None:
        if target_db is not None and (not target_db or any(c in target_db for c in '/\\. "$\0')):
            raise ConfigError(f"{target_db!r} is not a valid MongoDB database name")
        self._client = client
        self._params = params
        self._target_db = target_db
        self._drop = drop
        self._batch_documents = batch_documents
        self._batch_bytes = batch_bytes
        self._targets: dict[tuple[str, str], _Target] = {}
        self._databases: dict[str, str] = {}
        self._skipped: list[str] = []
        self._indexes = 0
        self._bytes = 0
        self._seen_prelude = False

    def handle(self, event: Prelude | Document | NamespaceEnd) -> None:
        if isinstance(event, Document):
            target = self._targets.get((event.db, event.collection))
            if target is not None:
                self._add(target, event.raw)
        elif isinstance(event, NamespaceEnd):
            self._end(event)
        else:
            self._prepare(event)

    def finish(self) -> RestoreResult:
        if not self._seen_prelude:
            raise IntegrityError("archive has no prelude")
        views = [t for t in self._targets.values() if t.is_view]
        for view in views:
            self._create(view)
        collections = {t.namespace: t.documents for t in self._targets.values() if not t.is_view}
        return RestoreResult(
            databases=dict(self._databases),
            collections=collections,
            views=tuple(v.namespace for v in views),
            indexes=self._indexes,
            documents=sum(collections.values()),
            document_bytes=self._bytes,
            skipped=tuple(self._skipped),
        )

    def _prepare(self, prelude: Prelude) -> None:
        self._seen_prelude = True
        for entry in prelude.namespaces:
            self._plan(entry)
        sources = sorted(self._databases)
        if self._target_db is not None and len(sources) > 1:
            raise ConfigError(f"the archive holds several databases ({', '.join(sources)})")
        with translate_errors(self._params, "preparing the restore"):
            self._clear_conflicts()
            for target in self._targets.values():
                if not target.is_view:
                    self._create(target)

    def _plan(self, entry: NamespaceMetadata) -> None:
        name = entry.collection
        if (entry.db, name) == (OPLOG_DB, OPLOG_COLLECTION) or name.startswith("$admin."):
            self._skipped.append(entry.namespace)
            return
        if name.startswith("system.") and name != "system.js":
            self._skipped.append(entry.namespace)
            return
        if entry.type == "timeseries":
            raise DumpError(f"time-series collection {entry.namespace} cannot be restored yet")
        meta = CollectionMetadata.from_json(entry.metadata) if entry.metadata else None
        meta = meta or CollectionMetadata(collection_name=name)
        kind = entry.type or meta.type or ("view" if "viewOn" in meta.options else "collection")
        target_db = self._target_db or entry.db
        self._databases[entry.db] = target_db
        self._targets[(entry.db, name)] = _Target(target_db, name, meta, kind == "view")

    def _clear_conflicts(self) -> None:
        by_db: dict[str, list[_Target]] = {}
        for target in self._targets.values():
            by_db.setdefault(target.db, []).append(target)
        for db_name, targets in by_db.items():
            db = self._client[db_name]
            existing = set(db.list_collection_names())
            conflicts = sorted(t.name for t in targets if t.name in existing)
            if conflicts and not self._drop:
                raise DumpError(
                    f"{db_name} already has {', '.join(conflicts)}; restore into another "
                    "database or drop them first"
                )
            for name in conflicts:
                log.info("dropping %s.%s before restoring it", db_name, name)
                db.drop_collection(name)

    def _create(self, target: _Target) -> None:
        options = {
            k: v for k, v in target.metadata.options.items() if k not in _CREATE_OPTIONS_DROPPED
        }
        if target.is_view and "viewOn" not in options:
            raise IntegrityError(f"view {target.namespace} has no viewOn in its metadata")
        with translate_errors(self._params, f"creating {target.namespace}"):
            self._client[target.db].command({"create": target.name, **options})

    def _add(self, target: _Target, raw: bytes) -> None:
        if target.is_view:
            raise IntegrityError(f"archive holds documents for view {target.namespace}")
        try:
            target.pending.append(RawBSONDocument(raw))
        except Exception as exc:  # the BSON layer raises several types on a bad document
            raise IntegrityError(f"invalid BSON document in {target.namespace}") from exc
        target.pending_bytes += len(raw)
        self._bytes += len(raw)
        full = target.pending_bytes >= self._batch_bytes
        if full or len(target.pending) >= self._batch_documents:
            self._flush(target)

    def _flush(self, target: _Target) -> None:
        if not target.pending:
            return
        collection = self._client[target.db][target.name]
        with translate_errors(self._params, f"inserting into {target.namespace}"):
            collection.insert_many(target.pending, ordered=True)
        target.documents += len(target.pending)
        target.pending, target.pending_bytes = [], 0

    def _end(self, event: NamespaceEnd) -> None:
        target = self._targets.get((event.db, event.collection))
        if not event.crc_ok:
            where = target.namespace if target else f"{event.db}.{event.collection}"
            raise IntegrityError(
                f"CRC mismatch for {event.db}.{event.collection}; restore stopped, "
                f"{where} may hold part of the data"
            )
        if target is None or target.is_view:
            return
        self._flush(target)
        self._create_indexes(target)
        log.info("restored %s: %d documents", target.namespace, target.documents)

    def _create_indexes(self, target: _Target) -> None:
        specs = [_index_spec(ix) for ix in target.metadata.indexes if ix.get("name") != "_id_"]
        if not specs:
            return
        with translate_errors(self._params, f"building indexes of {target.namespace}"):
            self._client[target.db].command({"createIndexes": target.name, "indexes": specs})
        self._indexes += len(specs)


def _index_spec(index: dict[str, Any]) -> dict[str, Any]:
    """An index definition as createIndexes takes it: without the legacy namespace field."""
    return {k: v for k, v in index.items() if k != "ns"}
