"""What the ``mongodump --archive`` format is made of: its constants, the CRC-64/XZ of a
namespace, the prelude's types, the reader's events, and the framing of one BSON document.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

import fastcrc
from bson import json_util
from bson.codec_options import DatetimeConversion

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

INT32: Final = struct.Struct("<i")
MIN_DOCUMENT_SIZE: Final = 5
UINT64_MASK: Final = (1 << 64) - 1
_JSON_OPTIONS: Final = json_util.CANONICAL_JSON_OPTIONS.with_options(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO
)

Namespace = tuple[str, str]


def crc64_xz(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Continue a CRC-64/XZ (Go's ``crc64.ECMA`` table with ``crc64.Update``) over ``data``."""
    return fastcrc.crc64.xz(data, crc)


def to_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit value as the signed int64 BSON stores."""
    value &= UINT64_MASK
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


class NamespaceState:
    """Per-namespace tally kept by the writer and the parser: CRC so far, counts, progress."""

    __slots__ = ("bytes", "crc", "documents", "ended", "opened")

    def __init__(self) -> None:
        self.crc = 0
        self.documents = 0
        self.bytes = 0
        self.opened = False
        self.ended = False


def document_size(data: bytes | bytearray, pos: int, available: int, limit: int) -> int:
    """The size of the document at ``pos``; raises when it cannot be a BSON document."""
    size: int = INT32.unpack_from(data, pos)[0]
    if size < MIN_DOCUMENT_SIZE or size > limit:
        raise IntegrityError(f"{size} is neither a valid BSON length nor a terminator")
    if size <= available and data[pos + size - 1] != 0:
        raise IntegrityError(f"BSON document of {size} bytes does not end with a null byte")
    return size
