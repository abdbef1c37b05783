"""Reading a ``mongodump --archive`` stream: one streaming state machine that trusts no
length, behind two front ends: :class:`ArchiveReader` (events, for restores) and
:class:`ArchiveVerifier` (checks only, for the collector's ingest check).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

import bson
from bson.codec_options import CodecOptions, DatetimeConversion

from common.errors import IntegrityError
from common.mongo_archive.format import (
    FORMAT_VERSION,
    INT32,
    MAGIC_BYTES,
    MAX_DOCUMENT_SIZE,
    MAX_HEADER_SIZE,
    MAX_NAMESPACES,
    MAX_PRELUDE_SIZE,
    UINT64_MASK,
    ArchiveHeader,
    CollectionMetadata,
    Document,
    Event,
    Namespace,
    NamespaceEnd,
    NamespaceMetadata,
    NamespaceState,
    Prelude,
    crc64_xz,
    document_size,
)

_TERMINATOR_VALUE: Final = -1
_BUCKETS_PREFIX: Final = "system.buckets."
_HEADER_KEYS: Final = frozenset({"db", "collection", "EOF", "CRC"})
_DECODE_OPTIONS: Final[CodecOptions[dict[str, Any]]] = CodecOptions(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


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
        _integer(doc["CRC"], "namespace header CRC") & UINT64_MASK,
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
        self._namespaces: dict[Namespace, NamespaceState] = {}
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
            if INT32.unpack_from(buf, pos)[0] == _TERMINATOR_VALUE:
                self._on_terminator()
                pos += 4
                continue
            size = document_size(buf, pos, available, self._size_limit())
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
        self._namespaces[key] = NamespaceState()
        if entry.type == "timeseries":
            # mongodump writes a time-series collection's data under its buckets collection.
            self._timeseries.add(key)
        else:
            self._required.add(key)

    def _finish_prelude(self) -> None:
        assert self._header is not None
        self._events.append(Prelude(self._header, tuple(self._entries)))
        self._state = _BLOCK_STATE

    def _namespace_state(self, key: Namespace) -> NamespaceState:
        state = self._namespaces.get(key)
        db, coll = key
        bucket_of = coll[len(_BUCKETS_PREFIX) :] if coll.startswith(_BUCKETS_PREFIX) else None
        if state is None and (db, bucket_of) in self._timeseries:
            state = self._namespaces[key] = NamespaceState()
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
        keep, events, unpack = self._keep, self._events, INT32.unpack_from
        try:
            while end - pos >= 4:
                if unpack(buf, pos)[0] == _TERMINATOR_VALUE:
                    self._state = _BLOCK_STATE
                    self._current = None
                    break
                size = document_size(buf, pos, end - pos, MAX_DOCUMENT_SIZE)
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
