"""Writing a ``mongodump --archive`` stream: the prelude, blocks of raw documents cut at
a block size, and each namespace's EOF block with its CRC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bson

from common.errors import IntegrityError
from common.mongo_archive.format import (
    DEFAULT_BLOCK_SIZE,
    MAGIC_BYTES,
    MAX_DOCUMENT_SIZE,
    MIN_DOCUMENT_SIZE,
    TERMINATOR,
    ArchiveHeader,
    Namespace,
    NamespaceMetadata,
    NamespaceState,
    crc64_xz,
    document_size,
    to_int64,
)


def _encode_header(db: str, collection: str, *, eof: bool, crc: int) -> bytes:
    doc = {"db": db, "collection": collection, "EOF": eof, "CRC": bson.Int64(to_int64(crc))}
    return bson.encode(doc)


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
        self._namespaces: dict[Namespace, NamespaceState] = {}
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
            self._namespaces[key] = NamespaceState()
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

    def _state(self, db: str, collection: str) -> NamespaceState:
        state = self._namespaces.get((db, collection))
        if state is None:
            raise ValueError(f"namespace {db}.{collection} is not in the prelude")
        if state.ended:
            raise ValueError(f"namespace {db}.{collection} has already ended")
        return state

    def _block_cuts(self, data: bytes, state: NamespaceState) -> list[int]:
        """Check every document's framing; return the offsets where a new block starts."""
        cuts: list[int] = []
        pos, end = 0, len(data)
        block_bytes, limit = self._block_bytes, self._block_size
        while pos < end:
            if end - pos < MIN_DOCUMENT_SIZE:
                raise IntegrityError("trailing bytes after the last BSON document")
            size = document_size(data, pos, end - pos, MAX_DOCUMENT_SIZE)
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
