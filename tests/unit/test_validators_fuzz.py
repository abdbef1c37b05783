"""Property tests for everything that reads a peer's bytes before the collector trusts them.

The frame decoder, the channel state machine, event decoding, the start-time parser and
the database-name checks are fed arbitrary input. Each either accepts it, with the
guarantees stated per test, or refuses it with its one documented error; none raises
anything else, and none touches the file system. A whole collector session fed the same
kind of input leaves no file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import zstandard
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from collector.report.outcomes import FanOut
from collector.serve.context import SessionContext
from collector.serve.session import BackhaulSession
from collector.serve.upload import parse_started_at
from collector.store.files import Store
from common.errors import RejectCode, RemoteProtocolError
from common.events import EVENT_TYPES, Event, Reject, decode_payload
from common.frames import (
    DEFAULT_DATA_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from common.naming import (
    EXTENSIONS,
    MAX_DB_NAME_CHARS,
    MAX_ENCODED_NAME,
    backup_name,
    check_database_name,
    decode_database,
    encode_database,
    parse_backup_name,
)
from common.protocol import Closed, Connection, Role

NOW = datetime(2026, 11, 26, 1, 30, tzinfo=UTC).timestamp()
SAFE_ENCODED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%")
# Characters that look alike or normalise alike, and the separators of a stored name.
CONFUSABLE = "o\u043e0\u03bfO\u0435e\u00e9\u0301a\u0430\u0251_-.%/ \u00a0\u200b\u202e"

# --- no file-system writes -------------------------------------------------------------------

_WRITES: list[tuple[str, tuple[Any, ...]]] = []
_WATCHING = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.link", "os.symlink", "os.remove", "os.truncate"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCHING:
        return
    if event == "open":
        _, mode, flags = (*args, None, None)[:3]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        ):
            _WRITES.append((event, args))
    elif event in _WRITE_EVENTS:
        _WRITES.append((event, args))


sys.addaudithook(_audit)


@contextlib.contextmanager
def no_file_writes() -> Iterator[None]:
    """The code under test opens nothing for writing and creates, moves or removes nothing."""
    global _WATCHING
    _WRITES.clear()
    _WATCHING = True
    try:
        yield
    finally:
        _WATCHING = False
    assert _WRITES == []


def test_the_write_watch_sees_a_write(tmp_path: Path) -> None:
    """Control: the audit hook does catch a file being created."""
    with contextlib.suppress(AssertionError), no_file_writes():
        (tmp_path / "x").write_text("x")
    assert _WRITES and _WRITES[0][0] == "open"


# --- strategies -----------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=6,
)
FIELD_NAMES = sorted(
    {
        "versions", "max_data", "software", "database", "engine", "format", "compression",
        "started_at", "size_estimate", "source", "byte_count", "sha256", "metadata",
        "reason", "message", "kind", "at", "name", "code", "backups", "manifest", "size",
    }
)  # fmt: skip
EVENT_OBJECTS = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=8), JSON, max_size=6
)
FRAME_TYPES = st.sampled_from(list(FrameType)) | st.integers(min_value=0, max_value=255)
TIMES = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.none() | st.just(UTC) | st.timezones(),
)
NEAR_NOW = st.floats(-2000, 2000).map(
    lambda s: datetime.fromtimestamp(NOW + s, UTC).isoformat(timespec="seconds")
)
START_TEXTS = st.text(max_size=64) | TIMES.map(lambda t: t.isoformat()) | NEAR_NOW
NAMES = st.text(max_size=80) | st.text(st.sampled_from(CONFUSABLE), min_size=1, max_size=12)
PLAUSIBLE_NAMES = (
    st.text(
        st.characters(categories=("L", "N", "P", "Zs"), max_codepoint=0xFFFF),
        min_size=1,
        max_size=20,
    )
    .map(str.rstrip)
    .filter(bool)
)


def payload_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- frames and events ------------------------------------------------------------------------


def decode_chunks(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], str | None]:
    """Frames decoded from ``chunks`` and the refusal, if any; checks the buffer bound."""
    decoder = FrameDecoder(DEFAULT_DATA_PAYLOAD)
    frames: list[tuple[int, bytes]] = []
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            while (frame := decoder.next_frame()) is not None:
                frames.append((int(frame.type), frame.payload))
        except RemoteProtocolError as exc:
            assert exc.reject_code in (RejectCode.PROTOCOL, RejectCode.TOO_LARGE)
            return frames, str(exc)
        assert decoder.buffered < HEADER_SIZE + max(DEFAULT_DATA_PAYLOAD, MAX_CONTROL_PAYLOAD)
    return frames, None


STREAMS = st.lists(
    st.tuples(FRAME_TYPES, st.binary(max_size=64)).map(
        lambda t: HEADER.pack(t[0], len(t[1])) + t[1]
    )
    | st.binary(max_size=32),
    max_size=8,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(stream=STREAMS, cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_frame_decoder_refuses_or_decodes_the_same_however_the_bytes_arrive(
    stream: bytes, cuts: list[int]
) -> None:
    """Split anywhere, a stream gives the same frames and the same refusal."""
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    with no_file_writes():
        whole = decode_chunks([stream])
        split = decode_chunks([stream[a:b] for a, b in itertools.pairwise(bounds)])
    assert split == whole
    for kind, payload in whole[0]:
        assert kind in FrameType.__members__.values()
        assert encode_frame(FrameType(kind), payload) in stream


@settings(max_examples=200, deadline=None)
@given(kind=FRAME_TYPES, length=st.integers(min_value=0, max_value=2**32 - 1))
def test_frame_decoder_judges_a_length_from_the_header_alone(kind: int, length: int) -> None:
    """An over-cap length is refused on its 5 header bytes, before any payload arrives."""
    decoder = FrameDecoder(DEFAULT_DATA_PAYLOAD)
    decoder.feed(HEADER.pack(kind, length))
    cap = DEFAULT_DATA_PAYLOAD if kind == FrameType.DATA else MAX_CONTROL_PAYLOAD
    try:
        frame = decoder.next_frame()
    except RemoteProtocolError as exc:
        assert kind not in FrameType.__members__.values() or length > cap, exc
    else:
        assert kind in FrameType.__members__.values() and length <= cap
        assert frame is None or length == 0


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(list(FrameType)), obj=EVENT_OBJECTS | JSON)
def test_event_decoding_accepts_or_refuses_with_a_protocol_error(kind: FrameType, obj: Any) -> None:
    """Any JSON in any frame: a well-typed event or RemoteProtocolError, nothing else."""
    with no_file_writes():
        try:
            event = decode_payload(kind, payload_bytes(obj))
        except RemoteProtocolError:
            return
    assert isinstance(event, EVENT_TYPES[kind])


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(list(FrameType)), data=st.binary(max_size=200))
def test_event_decoding_of_raw_bytes_never_crashes(kind: FrameType, data: bytes) -> None:
    with no_file_writes(), contextlib.suppress(RemoteProtocolError):
        decode_payload(kind, data)


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(st.tuples(st.sampled_from(list(FrameType)), EVENT_OBJECTS), max_size=4),
    tail=st.binary(max_size=16),
    eof=st.booleans(),
)
def test_collector_state_machine_only_ever_raises_remote_protocol_errors(
    frames: list[tuple[FrameType, dict[str, Any]]], tail: bytes, eof: bool
) -> None:
    """Any sequence of frames, in any order, ends in events, Closed or a RemoteProtocolError."""
    hello = encode_frame(FrameType.HELLO, b'{"versions":[1],"max_data":65536,"software":"x"}')
    stream = hello + b"".join(encode_frame(k, payload_bytes(o)) for k, o in frames) + tail
    conn = Connection(Role.COLLECTOR)
    with no_file_writes():
        conn.receive_data(stream)
        if eof:
            conn.receive_data(b"")
        try:
            while (event := conn.next_event()) is not None:
                assert isinstance(event, Event)
                if isinstance(event, Closed):
                    break
                if event.frame_type is FrameType.HELLO:
                    conn.send(conn.hello(conn.choose_version(event)))
        except RemoteProtocolError as exc:
            assert exc.reject_code in set(RejectCode)


# --- the start time ---------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(text=START_TEXTS, skew=st.floats(min_value=0, max_value=10**6))
@example(text="2026-11-26T01:30:00+00:00", skew=0.0)
@example(text="2026-11-26T01:30:00-00:00", skew=1.0)
@example(text="2026-11-26T03:30:00+02:00", skew=1.0)
@example(text="2026-11-26T01:30:00Z", skew=1.0)
@example(text="0001-01-01T00:00:00+00:00", skew=1e6)
@example(text="9999-12-31T23:59:59.999999+00:00", skew=1e6)
@example(text="2026-11-26T01:30:00+00:00\n", skew=1.0)
def test_start_time_is_a_utc_time_near_the_clock_or_bad_time(text: str, skew: float) -> None:
    """parse_started_at returns an aware UTC time within ``skew`` or raises bad_time."""
    with no_file_writes():
        try:
            started = parse_started_at(text, NOW, skew)
        except RemoteProtocolError as exc:
            assert exc.reject_code is RejectCode.BAD_TIME
            return
    assert started.utcoffset() == timedelta(0)
    assert abs(started.timestamp() - NOW) <= skew
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0) and parsed == started


@settings(max_examples=200, deadline=None)
@given(when=TIMES)
def test_only_utc_offsets_are_accepted(when: datetime) -> None:
    """A time with any other offset, or none, is refused even if it names the right instant."""
    text = when.isoformat()
    offset = when.utcoffset()
    try:
        parse_started_at(text, when.replace(tzinfo=when.tzinfo or UTC).timestamp(), 1.0)
    except RemoteProtocolError as exc:
        assert exc.reject_code is RejectCode.BAD_TIME
        assert offset != timedelta(0), text
    else:
        assert offset == timedelta(0)


def test_named_offsets_are_refused() -> None:
    for tz in (timezone(timedelta(hours=2)), timezone(timedelta(minutes=-30))):
        text = datetime.fromtimestamp(NOW, tz).isoformat()
        try:
            parse_started_at(text, NOW, 3600)
        except RemoteProtocolError as exc:
            assert exc.reject_code is RejectCode.BAD_TIME
        else:
            raise AssertionError(f"{text} was accepted")


# --- database names ----------------------------------------------------------------------------


def accepted(name: str) -> bool:
    try:
        check_database_name(name)
    except RemoteProtocolError as exc:
        assert exc.reject_code is RejectCode.BAD_NAME
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(name=NAMES)
@example(name="\ud800")
@example(name="a\x00")
@example(name="x" * 65)
@example(name="ok ")
@example(name="..")
def test_accepted_names_encode_to_one_safe_reversible_file_name(name: str) -> None:
    """Accepted: a safe, bounded, reversible encoding; refused: reject code bad_name only."""
    with no_file_writes():
        ok = accepted(name)
        if not ok:
            return
        encoded = encode_database(name)
    assert 0 < len(name) <= MAX_DB_NAME_CHARS and name == name.rstrip()
    assert set(encoded) <= SAFE_ENCODED and not encoded.startswith(("-", "."))
    assert len(encoded) <= MAX_ENCODED_NAME
    assert decode_database(encoded) == name
    root = Path("/store")
    assert Store(root).database_folder("db1", name) == root / "db1" / encoded


@settings(max_examples=300, deadline=None)
@given(
    a=st.text(st.sampled_from(CONFUSABLE), min_size=1, max_size=6),
    b=st.text(st.sampled_from(CONFUSABLE), min_size=1, max_size=6),
)
def test_look_alike_names_never_share_a_file_name(a: str, b: str) -> None:
    """Names that differ in any code point, however alike they look, are stored apart."""
    assume(a != b and accepted(a) and accepted(b))
    assert encode_database(a) != encode_database(b)


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=40))
def test_encoding_any_text_fails_only_on_lone_surrogates(name: str) -> None:
    """encode_database works on any text a JSON string can hold except half a UTF-16 pair."""
    try:
        encoded = encode_database(name)
    except UnicodeEncodeError:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in name)
        assert not accepted(name)
    else:
        assert decode_database(encoded) == name


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("AZaz09_-%.CDEF/"), max_size=30) | st.text(max_size=30))
def test_decoding_any_text_refuses_or_inverts(text: str) -> None:
    """decode_database raises ValueError or returns the one name that encodes to ``text``."""
    with no_file_writes():
        try:
            name = decode_database(text)
        except ValueError:
            return
    assert encode_database(name) == text


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=60)
    | st.builds(
        lambda n, d, s, e: f"{n}_{d}{s}.{e}",
        st.text(st.sampled_from("ab%2E0_-"), max_size=8),
        st.text(st.sampled_from("0123456789"), min_size=8, max_size=8),
        st.sampled_from(["", "-1", "-2", "-02", "-9999", "-10000"]),
        st.sampled_from([*EXTENSIONS.values(), "sql", "tar.gz"]),
    )
)
def test_a_stored_name_parses_back_only_to_itself(text: str) -> None:
    """parse_backup_name returns None or the parts that build exactly ``text``."""
    with no_file_writes():
        parsed = parse_backup_name(text)
    if parsed is not None:
        assert backup_name(parsed.database, parsed.day, parsed.seq, parsed.ext) == text
        assert isinstance(parsed.day, date)


# --- a whole session: never a file ------------------------------------------------------------


class _Channel:
    """What BackhaulSession uses of its SSH channel: write, close, flow control."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:  # only internal errors log a traceback
            self.records.append(record)


def run_session(data: bytes, root: Path) -> list[Event]:
    """Feed ``data`` and EOF to one collector session; return what it answered."""

    async def main() -> bytes:
        ctx = SessionContext(
            store=Store(root), timezone=UTC, outcomes=FanOut(), idle_timeout=5.0,
            handshake_timeout=5.0, clock=lambda: NOW,
        )  # fmt: skip
        channel = _Channel()
        session = BackhaulSession(ctx, "db1", "127.0.0.1:1")
        session.connection_made(channel)  # type: ignore[arg-type,unused-ignore]
        session.session_started()
        session.data_received(data, None)
        session.eof_received()
        await asyncio.wait_for(asyncio.gather(*ctx.tasks), 10)
        session.connection_lost(None)
        return bytes(channel.out)

    decoder = FrameDecoder(DEFAULT_DATA_PAYLOAD)
    decoder.feed(asyncio.run(main()))
    return [decode_payload(f.type, f.payload) for f in iter(decoder.next_frame, None)]


def _begin(database: str, started_at: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "database": database, "engine": "mysql", "format": "sql", "compression": "zstd",
        "started_at": started_at, **extra,
    }  # fmt: skip


HELLO = encode_frame(FrameType.HELLO, b'{"versions":[1],"max_data":65536,"software":"x"}')
DUMP = zstandard.ZstdCompressor().compress(b"-- MariaDB dump\nINSERT INTO t VALUES (1);\n")
# After a BEGIN that passes every check: DATA (often a real zstd stream, whole or cut),
# then END, ABORT or anything at all; never an END that matches, which would store it.
UPLOAD_TAIL = st.lists(
    st.one_of(
        st.builds(lambda n: encode_frame(FrameType.DATA, DUMP[:n]), st.integers(0, len(DUMP))),
        st.binary(max_size=64).map(lambda b: encode_frame(FrameType.DATA, b)),
        st.builds(
            lambda n: encode_frame(
                FrameType.END, payload_bytes({"byte_count": n, "sha256": "0" * 64})
            ),
            st.integers(0, 200),
        ),
        st.tuples(st.sampled_from(list(FrameType)), JSON).map(
            lambda t: encode_frame(t[0], payload_bytes(t[1]))
        ),
        st.binary(max_size=16),
    ),
    max_size=5,
).map(b"".join)
VALID_BEGINS = st.builds(
    lambda db, s: _begin(db, datetime.fromtimestamp(NOW + s, UTC).isoformat(), {}),
    st.sampled_from(["hospital", "a/b", "..", ".hidden", "sp ace", "\u00fcn\u00ef"])
    | PLAUSIBLE_NAMES,
    st.floats(-500, 500),
)

SESSION_INPUT = st.one_of(
    st.builds(
        lambda begin, tail: HELLO + encode_frame(FrameType.BEGIN, payload_bytes(begin)) + tail,
        VALID_BEGINS,
        UPLOAD_TAIL,
    ),
    st.binary(max_size=300),
    st.builds(
        lambda db, at, extra, frames, tail: (
            HELLO
            + encode_frame(FrameType.BEGIN, payload_bytes(_begin(db, at, extra)))
            + b"".join(encode_frame(k, payload_bytes(o)) for k, o in frames)
            + tail
        ),
        PLAUSIBLE_NAMES | NAMES,
        NEAR_NOW | START_TEXTS,
        st.dictionaries(st.text(max_size=8), JSON, max_size=3) | EVENT_OBJECTS,
        st.lists(
            st.tuples(st.sampled_from([FrameType.DATA, FrameType.END, FrameType.ABORT]), JSON),
            max_size=3,
        ),
        st.binary(max_size=20),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=SESSION_INPUT)
def test_a_session_fed_anything_leaves_no_file_and_no_internal_error(data: bytes) -> None:
    """Whatever arrives, the store holds no file afterwards and no request ends in a bug.

    (Only a complete dump with a matching byte count and SHA-256 is ever stored; random
    input never is one.)
    """
    errors = _Errors()
    logger = logging.getLogger("collector.serve.session")
    logger.addHandler(errors)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            answers = run_session(data, root)
            leftovers = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
            folders = [p.relative_to(root) for p in root.rglob("*")] if root.exists() else []
    finally:
        logger.removeHandler(errors)
    assert leftovers == []
    assert all(p.parts[0] == "db1" and len(p.parts) <= 2 for p in folders)
    assert errors.records == []
    for answer in answers:
        assert not (isinstance(answer, Reject) and answer.code == RejectCode.INTERNAL)
