"""The ``mongodump --archive`` format, sans-io: a writer, a streaming reader and a verifier.

Layout (mongo-tools ``common/archive``): the magic number ``0x8199e26d`` as a little-endian
uint32; a prelude made of a header document, one metadata document per namespace and a
terminator (``ff ff ff ff``); then blocks, each a namespace header ``{db, collection,
EOF: false, CRC: 0}``, raw BSON documents and a terminator. Every namespace ends with a
header whose ``EOF`` is true and whose ``CRC`` (an int64) is the CRC-64/XZ of all of that
namespace's document bytes, followed by a terminator. The oplog, when present, is the
namespace ``("", "oplog")`` and comes last.

Nothing here trusts a length read from the stream: document sizes, header sizes and the
prelude are capped, and every malformed input surfaces as :class:`IntegrityError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import bson
import fastcrc
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion

from common.errors import IntegrityError

MAGIC: Final = 0x8199E26D
MAGIC_BYTES: Final = struct.pack("<I", MAGIC)
TERMINATOR: Final = b"\xff\xff\xff\xff"
FORMAT_VERSION: Final = "0.1"
OPLOG_DB: Final = ""
OPLOG_COLLECTION: Final = "oplog"

MAX_BSON_SIZE: Final = 16 * 1024 * 1024
# The server allows internal documents (oplog entries) this much over the user limit.
MAX_DOCUMENT_SIZE: Final = MAX_BSON_SIZE + 16 * 1024
MAX_HEADER_SIZE: Final = 64 * 1024
MAX_PRELUDE_SIZE: Final = 64 * 1024 * 1024
MAX_NAMESPACES: Final = 100_000
DEFAULT_BLOCK_SIZE: Final = 1024 * 1024

_INT32: Final = struct.Struct("<i")
_TERMINATOR_VALUE: Final = -1
_MIN_DOCUMENT_SIZE: Final = 5
_UINT64_MASK: Final = (1 << 64) - 1
_BUCKETS_PREFIX: Final = "system.buckets."
_HEADER_KEYS: Final = frozenset({"db", "collection", "EOF", "CRC"})
_DECODE_OPTIONS: Final[CodecOptions[dict[str, Any]]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_JSON_OPTIONS: Final = json_util.CANONICAL_JSON_OPTIONS.with_options(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)

Namespace = tuple[str, str]


def crc64_xz(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Continue a CRC-64/XZ (Go's ``crc64.ECMA`` table with ``crc64.Update``) over ``data``."""
    return fastcrc.crc64.xz(data, crc)


def to_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit value as the signed int64 BSON stores."""
    value &= _UINT64_MASK
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True, slots=True)
class ArchiveHeader:
    """The archive's first document."""

    server_version: str
    tool_version: str
    concurrent_collections: int = 1
    version: str = FORMAT_VERSION


@dataclass(frozen=True, slots=True)
class NamespaceMetadata:
    """One prelude entry: a namespace, its metadata JSON (may be empty) and size."""

    db: str
    collection: str
    metadata: str = ""
    size: int = 0
    type: str = ""

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.collection}"


@dataclass(frozen=True, slots=True)
class CollectionMetadata:
    """The parsed ``metadata`` string of a prelude entry (what ``metadata.json`` holds)."""

    options: dict[str, Any] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(default_factory=list)
    uuid: str = ""
    collection_name: str = ""
    type: str = ""

    def to_json(self) -> str:
        """Canonical Extended JSON with mongodump's key order, empty fields left out."""
        doc: dict[str, Any] = {}
        if self.options:
            doc["options"] = self.options
        doc["indexes"] = self.indexes
        if self.uuid:
            doc["uuid"] = self.uuid
        doc["collectionName"] = self.collection_name
        if self.type:
            doc["type"] = self.type
        return json_util.dumps(doc, json_options=_JSON_OPTIONS, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CollectionMetadata:
        """Parse a metadata string; raises :class:`IntegrityError` when it is malformed."""
        try:
            doc = json_util.loads(text, json_options=_JSON_OPTIONS)
        except Exception as exc:  # the JSON and BSON layers raise many types on garbage
            raise IntegrityError(f"collection metadata is not valid Extended JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise IntegrityError("collection metadata is not a JSON object")
        options = doc.get("options", {})
        indexes = doc.get("indexes", [])
        if not isinstance(options, dict) or not isinstance(indexes, list):
            raise IntegrityError("collection metadata has malformed options or indexes")
        if not all(isinstance(ix, dict) for ix in indexes):
            raise IntegrityError("collection metadata has a malformed index definition")
        strings = [doc.get(key, "") for key in ("uuid", "collectionName", "type")]
        if not all(type(value) is str for value in strings):
            raise IntegrityError("collection metadata has a malformed uuid, name or type")
        return cls(options, indexes, *strings)


@dataclass(frozen=True, slots=True)
class Prelude:
    """Event: the archive's header and the namespaces it announces, in order."""

    header: ArchiveHeader
    namespaces: tuple[NamespaceMetadata, ...]


@dataclass(frozen=True, slots=True)
class Document:
    """Event: one raw BSON document of a namespace, never decoded."""

    db: str
    collection: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class NamespaceEnd:
    """Event: a namespace's EOF block; ``crc_ok`` says whether its CRC matched."""

    db: str
    collection: str
    crc_ok: bool
    documents: int
    bytes: int


Event = Prelude | Document | NamespaceEnd


class _NamespaceState:
    __slots__ = ("bytes", "crc", "documents", "ended", "opened")

    def __init__(self) -> None:
        self.crc = 0
        self.documents = 0
        self.bytes = 0
        self.opened = False
        self.ended = False


def _encode_header(db: str, collection: str, *, eof: bool, crc: int) -> bytes:
    doc = {"db": db, "collection": collection, "EOF": eof, "CRC": bson.Int64(to_int64(crc))}
    return bson.encode(doc)


def _document_size(data: bytes | bytearray, pos: int, available: int, limit: int) -> int:
    """The size of the document at ``pos``; raises when it cannot be a BSON document."""
    size: int = _INT32.unpack_from(data, pos)[0]
    if size < _MIN_DOCUMENT_SIZE or size > limit:
        raise IntegrityError(f"{size} is neither a valid BSON length nor a terminator")
    if size <= available and data[pos + size - 1] != 0:
        raise IntegrityError(f"BSON document of {size} bytes does not end with a null byte")
    return size


class ArchiveWriter:
    """Produces archive bytes; every call returns the bytes to append to the stream.

    Call :meth:`prelude` once, then for each namespace :meth:`begin_block`, any number of
    :meth:`document` / :meth:`documents` calls and :meth:`end_namespace`. Blocks are cut
    every ``block_size`` bytes so a reader never needs more than one document in memory.
    Calls out of order raise :class:`ValueError`; a malformed document raises
    :class:`IntegrityError`.
    """

    def __init__(self, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self._block_size = block_size
        self._namespaces: dict[Namespace, _NamespaceState] = {}
        self._current: Namespace | None = None
        self._block_bytes = 0
        self._started = False

    def prelude(self, header: ArchiveHeader, namespaces: Sequence[NamespaceMetadata]) -> bytes:
        """The magic number, header, one metadata entry per namespace and a terminator."""
        if self._started:
            raise ValueError("the prelude was already written")
        parts = [MAGIC_BYTES, bson.encode(_header_doc(header))]
        for ns in namespaces:
            key = (ns.db, ns.collection)
            if key in self._namespaces:
                raise ValueError(f"namespace {ns.namespace!r} appears twice in the prelude")
            self._namespaces[key] = _NamespaceState()
            parts.append(bson.encode(_metadata_doc(ns)))
        parts.append(TERMINATOR)
        self._started = True
        return b"".join(parts)

    def begin_block(self, db: str, collection: str) -> bytes:
        """Start a block of documents for a namespace, closing any block still open."""
        state = self._state(db, collection)
        prefix = TERMINATOR if self._current is not None else b""
        self._current = (db, collection)
        self._block_bytes = 0
        state.opened = True
        return prefix + _encode_header(db, collection, eof=False, crc=0)

    def document(self, raw: bytes) -> bytes:
        """Append one raw BSON document to the open block."""
        return self.documents(raw)

    def documents(self, data: bytes) -> bytes:
        """Append raw BSON documents laid end to end (one cursor batch) to the open block."""
        if self._current is None:
            raise ValueError("no block is open")
        state = self._namespaces[self._current]
        cuts = self._block_cuts(data, state)
        state.crc = crc64_xz(data, state.crc)
        state.bytes += len(data)
        if not cuts:
            return data
        header = TERMINATOR + _encode_header(*self._current, eof=False, crc=0)
        pieces: list[bytes] = []
        start = 0
        for cut in cuts:
            pieces.append(data[start:cut])
            start = cut
        pieces.append(data[start:])
        return header.join(pieces)

    def end_namespace(self, db: str, collection: str) -> bytes:
        """Close the namespace with its EOF block carrying the CRC of all its documents."""
        state = self._state(db, collection)
        parts = [] if state.opened else [self.begin_block(db, collection)]
        if self._current is not None:
            parts.append(TERMINATOR)
            self._current = None
        parts.append(_encode_header(db, collection, eof=True, crc=state.crc))
        parts.append(TERMINATOR)
        state.ended = True
        return b"".join(parts)

    @property
    def unfinished(self) -> list[Namespace]:
        """Namespaces of the prelude that have no EOF block yet."""
        return [key for key, state in self._namespaces.items() if not state.ended]

    def counts(self, db: str, collection: str) -> tuple[int, int]:
        """Documents and document bytes written so far for a namespace."""
        state = self._namespaces[(db, collection)]
        return state.documents, state.bytes

    def _state(self, db: str, collection: str) -> _NamespaceState:
        state = self._namespaces.get((db, collection))
        if state is None:
            raise ValueError(f"namespace {db}.{collection} is not in the prelude")
        if state.ended:
            raise ValueError(f"namespace {db}.{collection} has already ended")
        return state

    def _block_cuts(self, data: bytes, state: _NamespaceState) -> list[int]:
        """Check every document's framing; return the offsets where a new block starts."""
        cuts: list[int] = []
        pos, end = 0, len(data)
        block_bytes, limit = self._block_bytes, self._block_size
        while pos < end:
            if end - pos < _MIN_DOCUMENT_SIZE:
                raise IntegrityError("trailing bytes after the last BSON document")
            size = _document_size(data, pos, end - pos, MAX_DOCUMENT_SIZE)
            if size > end - pos:
                raise IntegrityError("BSON document runs past the end of its batch")
            if block_bytes and block_bytes + size > limit:
                cuts.append(pos)
                block_bytes = 0
            block_bytes += size
            state.documents += 1
            pos += size
        self._block_bytes = block_bytes
        return cuts


def _header_doc(header: ArchiveHeader) -> dict[str, Any]:
    return {
        "concurrent_collections": header.concurrent_collections,
        "version": header.version,
        "server_version": header.server_version,
        "tool_version": header.tool_version,
    }


def _metadata_doc(ns: NamespaceMetadata) -> dict[str, Any]:
    return {
        "db": ns.db,
        "collection": ns.collection,
        "metadata": ns.metadata,
        "size": ns.size,
        "type": ns.type,
    }


def _decode(doc: bytes, what: str) -> dict[str, Any]:
    try:
        decoded: dict[str, Any] = bson.decode(doc, codec_options=_DECODE_OPTIONS)
    except Exception as exc:  # the BSON decoder raises several types on garbage
        raise IntegrityError(f"{what} is not a valid BSON document: {exc}") from exc
    return decoded


def _name(value: object, what: str, *, empty: bool = True) -> str:
    # bson.Code subclasses str, so only an exact str is a name.
    if type(value) is not str or "\x00" in value or (not value and not empty):
        raise IntegrityError(f"{what} is missing or malformed")
    return value


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IntegrityError(f"{what} is not an integer")
    return value


def _parse_header(doc: dict[str, Any]) -> ArchiveHeader:
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"unsupported archive format version {version!r}")
    return ArchiveHeader(
        server_version=_name(doc.get("server_version", ""), "archive server_version"),
        tool_version=_name(doc.get("tool_version", ""), "archive tool_version"),
        concurrent_collections=_integer(
            doc.get("concurrent_collections", 1), "archive concurrent_collections"
        ),
        version=version,
    )


def _parse_metadata_entry(doc: dict[str, Any]) -> NamespaceMetadata:
    return NamespaceMetadata(
        db=_name(doc.get("db"), "prelude entry db"),
        collection=_name(doc.get("collection"), "prelude entry collection", empty=False),
        metadata=_name(doc.get("metadata", ""), "prelude entry metadata"),
        size=_integer(doc.get("size", 0), "prelude entry size"),
        type=_name(doc.get("type", ""), "prelude entry type"),
    )


def _parse_namespace_header(doc: dict[str, Any]) -> tuple[str, str, bool, int]:
    if set(doc) != _HEADER_KEYS:
        raise IntegrityError(f"namespace header has fields {sorted(doc)}")
    eof = doc["EOF"]
    if not isinstance(eof, bool):
        raise IntegrityError("namespace header EOF is not a boolean")
    return (
        _name(doc["db"], "namespace header db"),
        _name(doc["collection"], "namespace header collection", empty=False),
        eof,
        _integer(doc["CRC"], "namespace header CRC") & _UINT64_MASK,
    )


_MAGIC_STATE: Final = "magic"
_HEADER_STATE: Final = "header"
_ENTRIES_STATE: Final = "entries"
_BLOCK_STATE: Final = "block"
_BODY_STATE: Final = "body"
_AFTER_EOF_STATE: Final = "after-eof"


class _Parser:
    """The state machine shared by :class:`ArchiveReader` and :class:`ArchiveVerifier`."""

    def __init__(self, *, keep_documents: bool) -> None:
        self._keep = keep_documents
        self._buf = bytearray()
        self._state = _MAGIC_STATE
        self._offset = 0  # archive offset of self._buf[0], for messages
        self._cursor = 0  # parse position within self._buf, for messages
        self._events: list[Event] = []
        self._header: ArchiveHeader | None = None
        self._entries: list[NamespaceMetadata] = []
        self._prelude_bytes = 0
        self._namespaces: dict[Namespace, _NamespaceState] = {}
        self._required: set[Namespace] = set()
        self._timeseries: set[Namespace] = set()
        self._current: Namespace | None = None
        self._mismatches: list[str] = []
        self._failure: IntegrityError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failure is not None:
            raise IntegrityError(f"archive already failed: {self._failure}")
        self._buf += data
        try:
            pos = self._parse()
        except IntegrityError as exc:
            where = self._offset + self._cursor
            self._failure = IntegrityError(f"{exc} (near archive offset {where})")
            raise self._failure from exc
        except Exception as exc:  # a last guard: garbage must only ever be an IntegrityError
            where = self._offset + self._cursor
            self._failure = IntegrityError(f"archive parser failed near offset {where}")
            raise self._failure from exc
        del self._buf[:pos]
        self._offset += pos

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    @property
    def header(self) -> ArchiveHeader | None:
        return self._header

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            f"{db}.{coll}": {"documents": state.documents, "bytes": state.bytes}
            for (db, coll), state in self._namespaces.items()
        }

    def check_complete(self) -> None:
        if self._failure is not None:
            raise IntegrityError(f"archive already failed: {self._failure}")
        if self._buf or self._state != _BLOCK_STATE:
            raise IntegrityError(f"archive is truncated (ends in {self._state} state)")
        missing = sorted(f"{db}.{coll}" for db, coll in self._required)
        if missing:
            raise IntegrityError(f"archive ends before the EOF block of {', '.join(missing)}")
        if self._mismatches:
            raise IntegrityError(f"CRC mismatch for {', '.join(self._mismatches)}")

    def _crc_mismatch(self, namespace: str) -> None:
        self._mismatches.append(namespace)

    def _parse(self) -> int:
        buf, pos = self._buf, 0
        while True:
            self._cursor = pos
            if self._state == _BODY_STATE:
                pos = self._parse_body(buf, pos)
                if self._state == _BODY_STATE:
                    return pos
                continue
            available = len(buf) - pos
            if available < 4:
                return pos
            if self._state == _MAGIC_STATE:
                if buf[pos : pos + 4] != MAGIC_BYTES:
                    hint = " (it is still gzip-compressed)" if buf[:2] == b"\x1f\x8b" else ""
                    raise IntegrityError(f"stream does not begin with the archive magic{hint}")
                pos += 4
                self._state = _HEADER_STATE
                continue
            if _INT32.unpack_from(buf, pos)[0] == _TERMINATOR_VALUE:
                self._on_terminator()
                pos += 4
                continue
            size = _document_size(buf, pos, available, self._size_limit())
            if size > available:
                return pos
            self._on_document(bytes(buf[pos : pos + size]))
            pos += size

    def _size_limit(self) -> int:
        if self._state in (_HEADER_STATE, _ENTRIES_STATE):
            return min(MAX_DOCUMENT_SIZE, MAX_PRELUDE_SIZE - self._prelude_bytes)
        return MAX_HEADER_SIZE

    def _on_terminator(self) -> None:
        if self._state == _ENTRIES_STATE:
            self._finish_prelude()
        elif self._state == _AFTER_EOF_STATE:
            self._state = _BLOCK_STATE
        elif self._state == _HEADER_STATE:
            raise IntegrityError("archive has no header document")
        else:
            raise IntegrityError("consecutive terminators (a block without a header)")

    def _on_document(self, doc: bytes) -> None:
        if self._state == _HEADER_STATE:
            self._header = _parse_header(_decode(doc, "archive header"))
            self._prelude_bytes += len(doc)
            self._state = _ENTRIES_STATE
        elif self._state == _ENTRIES_STATE:
            self._add_entry(_parse_metadata_entry(_decode(doc, "prelude entry")))
            self._prelude_bytes += len(doc)
        elif self._state == _BLOCK_STATE:
            self._on_namespace_header(*_parse_namespace_header(_decode(doc, "block header")))
        else:
            raise IntegrityError("data follows an EOF header in the same block")

    def _add_entry(self, entry: NamespaceMetadata) -> None:
        key = (entry.db, entry.collection)
        if key in self._namespaces or len(self._entries) >= MAX_NAMESPACES:
            raise IntegrityError(f"prelude repeats {entry.namespace!r} or has too many entries")
        if entry.metadata:
            CollectionMetadata.from_json(entry.metadata)  # mongorestore refuses what fails here
        self._entries.append(entry)
        self._namespaces[key] = _NamespaceState()
        if entry.type == "timeseries":
            # mongodump writes a time-series collection's data under its buckets collection.
            self._timeseries.add(key)
        else:
            self._required.add(key)

    def _finish_prelude(self) -> None:
        assert self._header is not None
        self._events.append(Prelude(self._header, tuple(self._entries)))
        self._state = _BLOCK_STATE

    def _namespace_state(self, key: Namespace) -> _NamespaceState:
        state = self._namespaces.get(key)
        db, coll = key
        bucket_of = coll[len(_BUCKETS_PREFIX) :] if coll.startswith(_BUCKETS_PREFIX) else None
        if state is None and (db, bucket_of) in self._timeseries:
            state = self._namespaces[key] = _NamespaceState()
        if state is None:
            raise IntegrityError(f"block for {db}.{coll}, which the prelude does not announce")
        if state.ended:
            raise IntegrityError(f"block for {db}.{coll} after its EOF block")
        return state

    def _on_namespace_header(self, db: str, coll: str, eof: bool, crc: int) -> None:
        state = self._namespace_state((db, coll))
        if not eof:
            self._current = (db, coll)
            self._state = _BODY_STATE
            return
        state.ended = True
        self._required.discard((db, coll))
        crc_ok = crc == state.crc
        self._events.append(NamespaceEnd(db, coll, crc_ok, state.documents, state.bytes))
        self._state = _AFTER_EOF_STATE
        if not crc_ok:
            self._crc_mismatch(f"{db}.{coll}")

    def _parse_body(self, buf: bytearray, pos: int) -> int:
        assert self._current is not None
        db, coll = self._current
        state = self._namespaces[self._current]
        start, end, count = pos, len(buf), 0
        keep, events, unpack = self._keep, self._events, _INT32.unpack_from
        try:
            while end - pos >= 4:
                if unpack(buf, pos)[0] == _TERMINATOR_VALUE:
                    self._state = _BLOCK_STATE
                    self._current = None
                    break
                size = _document_size(buf, pos, end - pos, MAX_DOCUMENT_SIZE)
                if size > end - pos:
                    break
                if keep:
                    events.append(Document(db, coll, bytes(buf[pos : pos + size])))
                pos += size
                count += 1
        finally:
            if pos > start:
                with memoryview(buf)[start:pos] as span:
                    state.crc = crc64_xz(span, state.crc)
                state.documents += count
                state.bytes += pos - start
        return pos + 4 if self._state == _BLOCK_STATE else pos


class ArchiveReader:
    """Streaming reader: :meth:`feed` bytes, get events; :meth:`close` at the end.

    A CRC mismatch is reported as ``NamespaceEnd(crc_ok=False)`` as soon as the EOF block
    arrives, and :meth:`close` then raises. Any malformed input raises
    :class:`IntegrityError` from :meth:`feed`, and so does every later call.
    """

    def __init__(self) -> None:
        self._parser = _Parser(keep_documents=True)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse as much as ``data`` completes; returns the events it produced."""
        try:
            self._parser.feed(data)
        finally:
            events = self._parser.take_events()
        return events

    def close(self) -> None:
        """Raise :class:`IntegrityError` if the archive is truncated, incomplete or corrupt."""
        self._parser.check_complete()


class _VerifyingParser(_Parser):
    def _crc_mismatch(self, namespace: str) -> None:
        raise IntegrityError(f"CRC mismatch for {namespace}")


class ArchiveVerifier:
    """Checks an archive stream without keeping documents; for the collector.

    :meth:`feed` raises :class:`IntegrityError` as soon as the stream is malformed or a
    CRC mismatches; :meth:`finish` raises if it is truncated or a namespace never ended.
    """

    def __init__(self) -> None:
        self._parser = _VerifyingParser(keep_documents=False)
        self._archive_bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Check the next piece of the (uncompressed) archive."""
        self._archive_bytes += len(data)
        try:
            self._parser.feed(data)
        finally:
            self._parser.take_events()

    def finish(self) -> dict[str, Any]:
        """Summary of a complete, verified archive: namespaces, documents, bytes."""
        self._parser.check_complete()
        header = self._parser.header
        assert header is not None
        collections = self._parser.counts()
        return {
            "format_version": header.version,
            "server_version": header.server_version,
            "tool_version": header.tool_version,
            "archive_bytes": self._archive_bytes,
            "namespaces": len(collections),
            "documents": sum(c["documents"] for c in collections.values()),
            "document_bytes": sum(c["bytes"] for c in collections.values()),
            "collections": collections,
        }


def verify_archive(chunks: Iterable[bytes]) -> dict[str, Any]:
    """Verify a whole archive given as chunks; see :meth:`ArchiveVerifier.finish`."""
    verifier = ArchiveVerifier()
    for chunk in chunks:
        verifier.feed(chunk)
    return verifier.finish()


def iter_events(chunks: Iterable[bytes]) -> Iterator[Event]:
    """Every event of an archive given as chunks, checking completeness at the end."""
    reader = ArchiveReader()
    for chunk in chunks:
        yield from reader.feed(chunk)
    reader.close()
