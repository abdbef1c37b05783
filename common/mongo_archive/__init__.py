"""The ``mongodump --archive`` format, sans-io: a writer, a streaming reader and a verifier.

``format`` holds what both sides share, ``writer`` the writer, ``reader`` the reader and
the verifier (one state machine); everything public is importable from here.

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

from common.mongo_archive.format import (
    DEFAULT_BLOCK_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAGIC_BYTES,
    MAX_BSON_SIZE,
    MAX_DOCUMENT_SIZE,
    MAX_HEADER_SIZE,
    MAX_NAMESPACES,
    MAX_PRELUDE_SIZE,
    OPLOG_COLLECTION,
    OPLOG_DB,
    TERMINATOR,
    ArchiveHeader,
    CollectionMetadata,
    Document,
    Event,
    Namespace,
    NamespaceEnd,
    NamespaceMetadata,
    Prelude,
    crc64_xz,
    to_int64,
)
from common.mongo_archive.reader import (
    ArchiveReader,
    ArchiveVerifier,
    iter_events,
    verify_archive,
)
from common.mongo_archive.writer import ArchiveWriter

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAGIC_BYTES",
    "MAX_BSON_SIZE",
    "MAX_DOCUMENT_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_NAMESPACES",
    "MAX_PRELUDE_SIZE",
    "OPLOG_COLLECTION",
    "OPLOG_DB",
    "TERMINATOR",
    "ArchiveHeader",
    "ArchiveReader",
    "ArchiveVerifier",
    "ArchiveWriter",
    "CollectionMetadata",
    "Document",
    "Event",
    "Namespace",
    "NamespaceEnd",
    "NamespaceMetadata",
    "Prelude",
    "crc64_xz",
    "iter_events",
    "to_int64",
    "verify_archive",
]
