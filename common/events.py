"""Protocol events: the typed meaning of each frame, and strict JSON (de)serialisation.

Every field read from a peer is checked for type and size here, once, so the layers
above handle only well-formed events. Unknown JSON fields are ignored (a newer peer may
add some); missing or mistyped known fields are a remote protocol error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.errors import LocalProtocolError, RemoteProtocolError
from common.frames import MAX_CONTROL_PAYLOAD, FrameType

MAX_TEXT = 1024  # longest free-text field (reasons, messages)
MAX_NAME = 256  # longest database, source or backup name, in characters
MAX_META = 32 * 1024  # serialised size of a metadata object
SHA256_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def _text(obj: dict[str, Any], key: str, limit: int = MAX_TEXT, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RemoteProtocolError(f"field {key!r} must be a string")
    if len(value) > limit:
        raise RemoteProtocolError(f"field {key!r} is longer than {limit} characters")
    return value


def _int(obj: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    # bool is an int in Python; on the wire it is not.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RemoteProtocolError(f"field {key!r} must be an integer")
    if not 0 <= value < 2**63:
        raise RemoteProtocolError(f"field {key!r} is out of range")
    return value


def _meta(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"field {key!r} must be an object")
    if len(json.dumps(value)) > MAX_META:
        raise RemoteProtocolError(f"field {key!r} is larger than {MAX_META} bytes")
    return value


@dataclass(frozen=True)
class Event:
    """Base of all events; ``frame_type`` ties each class to its frame."""

    frame_type: ClassVar[FrameType]

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Event:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Event):
    """First frame each way: protocol versions offered (agent) or chosen (collector)."""

    frame_type: ClassVar[FrameType] = FrameType.HELLO
    versions: tuple[int, ...]
    max_data: int
    software: str = "backhaul"

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": list(self.versions),
            "max_data": self.max_data,
            "software": self.software,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Hello:
        versions = obj.get("versions")
        if (
            not isinstance(versions, list)
            or not 1 <= len(versions) <= 16
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions)
        ):
            raise RemoteProtocolError("field 'versions' must be a list of 1 to 16 integers")
        return cls(tuple(versions), _int(obj, "max_data"), _text(obj, "software", 128))


@dataclass(frozen=True)
class Begin(Event):
    """Agent starts a backup: what it is, and when the dump started (UTC, ISO 8601)."""

    frame_type: ClassVar[FrameType] = FrameType.BEGIN
    database: str
    engine: str
    format: str
    compression: str
    started_at: str
    size_estimate: int | None = None
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "engine": self.engine,
            "format": self.format,
            "compression": self.compression,
            "started_at": self.started_at,
            "size_estimate": self.size_estimate,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Begin:
        return cls(
            database=_text(obj, "database", MAX_NAME),
            engine=_text(obj, "engine", 32),
            format=_text(obj, "format", 32),
            compression=_text(obj, "compression", 32),
            started_at=_text(obj, "started_at", 64),
            size_estimate=_int(obj, "size_estimate", optional=True),
            source=_text(obj, "source", MAX_NAME, optional=True) or "",
        )


@dataclass(frozen=True)
class Data(Event):
    """A chunk of the compressed stream; its payload is raw bytes, not JSON."""

    frame_type: ClassVar[FrameType] = FrameType.DATA
    payload: bytes


@dataclass(frozen=True)
class End(Event):
    """Agent finished sending: total bytes, SHA-256 of them, dump metadata."""

    frame_type: ClassVar[FrameType] = FrameType.END
    byte_count: int
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"byte_count": self.byte_count, "sha256": self.sha256, "metadata": self.metadata}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> End:
        sha = _text(obj, "sha256", 64)
        if not SHA256_RE.match(sha):
            raise RemoteProtocolError("field 'sha256' must be 64 lower-case hex digits")
        return cls(_int(obj, "byte_count"), sha, _meta(obj, "metadata"))


ABORT_CODES = ("dump", "stall", "interrupted")


@dataclass(frozen=True)
class Abort(Event):
    """Agent gives up on this backup; nothing of it may be kept.

    ``code`` is one word for metrics and alerts (``ABORT_CODES``; empty when the agent
    gives none); ``reason`` is the free-text cause for the logs.
    """

    frame_type: ClassVar[FrameType] = FrameType.ABORT
    reason: str
    code: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "code": self.code}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Abort:
        code = _text(obj, "code", 32, optional=True) or ""
        if code and code not in ABORT_CODES:
            code = ""  # a newer agent's word: keep the ABORT, count it as plain "aborted"
        return cls(_text(obj, "reason"), code)


@dataclass(frozen=True)
class Stored(Event):
    """Collector stored and verified the backup under its final name."""

    frame_type: ClassVar[FrameType] = FrameType.STORED
    name: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Stored:
        return cls(_text(obj, "name", 2 * MAX_NAME), _text(obj, "sha256", 64), _int(obj, "size"))


@dataclass(frozen=True)
class Reject(Event):
    """Collector refuses the request; ``code`` is one word from RejectCode."""

    frame_type: ClassVar[FrameType] = FrameType.REJECT
    code: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Reject:
        return cls(_text(obj, "code", 32), _text(obj, "reason"))


@dataclass(frozen=True)
class Report(Event):
    """Agent tells the collector something it did not see: a failure before any BEGIN
    (kind "failure"), or the result of a restore drill (kind "drill_ok"/"drill_failed").
    """

    frame_type: ClassVar[FrameType] = FrameType.REPORT
    reason: str
    message: str
    database: str | None = None
    source: str | None = None
    at: str = ""
    kind: str = "failure"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "reason": self.reason,
            "message": self.message,
            "database": self.database,
            "source": self.source,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Report:
        return cls(
            reason=_text(obj, "reason", 64),
            message=_text(obj, "message"),
            database=_text(obj, "database", MAX_NAME, optional=True),
            source=_text(obj, "source", MAX_NAME, optional=True),
            at=_text(obj, "at", 64, optional=True) or "",
            kind=_report_kind(obj),
        )


REPORT_KINDS = ("failure", "drill_ok", "drill_failed")


def _report_kind(obj: dict[str, Any]) -> str:
    kind = _text(obj, "kind", 32, optional=True) or "failure"
    if kind not in REPORT_KINDS:
        raise RemoteProtocolError(f"REPORT kind must be one of {', '.join(REPORT_KINDS)}")
    return str(kind)


@dataclass(frozen=True)
class Ack(Event):
    """Collector received a REPORT."""

    frame_type: ClassVar[FrameType] = FrameType.ACK

    def to_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Ack:
        return cls()


@dataclass(frozen=True)
class ListRequest(Event):
    """Agent asks for the list of its own backups, optionally of one database."""

    frame_type: ClassVar[FrameType] = FrameType.LIST
    database: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"database": self.database}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ListRequest:
        return cls(_text(obj, "database", MAX_NAME, optional=True))


@dataclass(frozen=True)
class Listing(Event):
    """Collector's answer to LIST: manifests' summaries, newest last."""

    frame_type: ClassVar[FrameType] = FrameType.LISTING
    backups: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"backups": list(self.backups)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Listing:
        backups = obj.get("backups")
        if not isinstance(backups, list) or not all(isinstance(b, dict) for b in backups):
            raise RemoteProtocolError("field 'backups' must be a list of objects")
        return cls(tuple(backups))


@dataclass(frozen=True)
class Fetch(Event):
    """Agent asks for one of its own backups by database and stored name."""

    frame_type: ClassVar[FrameType] = FrameType.FETCH
    database: str
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"database": self.database, "name": self.name}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Fetch:
        return cls(_text(obj, "database", MAX_NAME), _text(obj, "name", 2 * MAX_NAME))


@dataclass(frozen=True)
class FetchMeta(Event):
    """Collector starts sending a stored backup: its manifest comes first."""

    frame_type: ClassVar[FrameType] = FrameType.FETCH_META
    name: str
    manifest: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "manifest": self.manifest}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FetchMeta:
        return cls(_text(obj, "name", 2 * MAX_NAME), _meta(obj, "manifest"))


EVENT_TYPES: dict[FrameType, type[Event]] = {
    cls.frame_type: cls
    for cls in (Hello, Begin, Data, End, Abort, Stored, Reject, Report, Ack, ListRequest,
                Listing, Fetch, FetchMeta)
}


def encode_payload(event: Event) -> bytes:
    """Serialise an event's payload (raw bytes for DATA, compact JSON otherwise)."""
    if isinstance(event, Data):
        return event.payload
    payload = json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(f"{event.frame_type.name} payload over the control cap")
    return payload


def decode_payload(frame_type: FrameType, payload: bytes) -> Event:
    """Build the event for one frame.

    Raises:
        RemoteProtocolError: the payload is not a JSON object or a field is wrong.
    """
    if frame_type is FrameType.DATA:
        return Data(payload)
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RemoteProtocolError(f"{frame_type.name} payload is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{frame_type.name} payload must be a JSON object")
    return EVENT_TYPES[frame_type].from_json(obj)
