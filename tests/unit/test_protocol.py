"""Tests for the sans-io channel state machine: whole conversations fed byte by byte,
out-of-order frames blamed on the right side, version negotiation, caps, EOF, and
strict field validation of every event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import LocalProtocolError, RejectCode, RemoteProtocolError
from common.events import (
    MAX_META,
    Abort,
    Ack,
    Begin,
    Data,
    End,
    Event,
    Fetch,
    FetchMeta,
    Hello,
    Listing,
    ListRequest,
    Reject,
    Report,
    Stored,
    decode_payload,
    encode_payload,
)
from common.frames import (
    DEFAULT_DATA_PAYLOAD,
    HEADER,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    FrameType,
    encode_frame,
)
from common.protocol import PROTOCOL_VERSIONS, Closed, Connection, Role, State

A, C = Role.AGENT, Role.COLLECTOR
SHA = "ab" * 32
Step = tuple[Role, Event]

HELLO_A = Hello(versions=PROTOCOL_VERSIONS, max_data=DEFAULT_DATA_PAYLOAD)
HELLO_C = Hello(versions=(1,), max_data=DEFAULT_DATA_PAYLOAD)
HANDSHAKE: list[Step] = [(A, HELLO_A), (C, HELLO_C)]
BEGIN = Begin(
    database="hospital",
    engine="mysql",
    format="sql",
    compression="zstd",
    started_at="2026-11-26T01:30:00+00:00",
    size_estimate=123456,
    source="db1",
)
END = End(byte_count=9, sha256=SHA, metadata={"tool": "mariadb-dump", "tables": 3})
STORED = Stored(name="hospital_20261126.sql.zst", sha256=SHA, size=9)
REPORT = Report(
    reason="dump",
    message="mariadb-dump exited with 2",
    database="hospital",
    source="db1",
    at="2026-11-26T01:30:05+00:00",
)
FETCH = Fetch(database="hospital", name="hospital_20261126.sql.zst")
FETCH_META = FetchMeta(name="hospital_20261126.sql.zst", manifest={"sha256": SHA, "size": 9})
LISTING = Listing(backups=({"name": "hospital_20261126.sql.zst", "size": 9},))

CONVERSATIONS: dict[str, list[Step]] = {
    "upload": [
        *HANDSHAKE,
        (A, BEGIN),
        (A, Data(b"abc")),
        (A, Data(b"")),
        (A, Data(b"defghi")),
        (A, END),
        (C, STORED),
    ],
    "upload_rejected_at_end": [
        *HANDSHAKE,
        (A, BEGIN),
        (A, Data(b"abc")),
        (A, END),
        (C, Reject("integrity", "SHA-256 mismatch")),
    ],
    "abort": [*HANDSHAKE, (A, BEGIN), (A, Data(b"abc")), (A, Abort("dump tool failed"))],
    "early_reject": [
        *HANDSHAKE,
        (A, BEGIN),
        (A, Data(b"abc")),
        (C, Reject("too_large", "backup exceeds the maximum size")),
    ],
    "reject_at_begin": [*HANDSHAKE, (A, BEGIN), (C, Reject("not_allowed", "not yours"))],
    "report": [*HANDSHAKE, (A, REPORT), (C, Ack())],
    "report_rejected": [*HANDSHAKE, (A, REPORT), (C, Reject("internal", "oops"))],
    "list": [*HANDSHAKE, (A, ListRequest("hospital")), (C, LISTING)],
    "list_all": [*HANDSHAKE, (A, ListRequest()), (C, Listing(()))],
    "fetch": [
        *HANDSHAKE,
        (A, FETCH),
        (C, FETCH_META),
        (C, Data(b"abc")),
        (C, Data(b"def")),
        (C, End(6, SHA, {})),
    ],
    "fetch_not_found": [*HANDSHAKE, (A, FETCH), (C, Reject("not_found", "no such backup"))],
    "no_common_version": [
        (A, Hello(versions=(7, 8), max_data=4096)),
        (C, Reject("protocol", "no common protocol version")),
    ],
    "busy_after_hello": [*HANDSHAKE, (C, Reject("busy", "too many connections"))],
}


def connection(role: Role) -> Connection:
    return Connection(role)


def other(role: Role) -> Role:
    return C if role is A else A


def live(script: list[Step]) -> tuple[Connection, Connection, bytes, bytes]:
    """Play ``script`` between two connections; return them and the bytes each sent."""
    conns = {A: connection(A), C: connection(C)}
    sent = {A: bytearray(), C: bytearray()}
    for sender, event in script:
        data = conns[sender].send(event)
        sent[sender] += data
        receiver = conns[other(sender)]
        receiver.receive_data(data)
        assert receiver.next_event() == event
        assert receiver.next_event() is None
    return conns[A], conns[C], bytes(sent[A]), bytes(sent[C])


def replay(script: list[Step], side: Role, peer_chunks: list[bytes]) -> Connection:
    """Play ``side`` of ``script`` while the peer's bytes arrive in ``peer_chunks``."""
    conn = connection(side)
    chunks: Iterator[bytes] = iter([c for c in peer_chunks if c])

    def next_event() -> Event:
        while (event := conn.next_event()) is None:
            conn.receive_data(next(chunks, b""))
        return event

    for sender, event in script:
        if sender is side:
            conn.send(event)
        else:
            assert next_event() == event
    for chunk in chunks:
        conn.receive_data(chunk)
    conn.receive_data(b"")
    assert next_event() == Closed()
    return conn


def at(prefix: list[Step]) -> tuple[Connection, Connection]:
    agent, collector, _, _ = live(prefix)
    return agent, collector


def frame_of(event: Event) -> bytes:
    return encode_frame(event.frame_type, encode_payload(event))


def drain(conn: Connection) -> list[Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
        if isinstance(event, Closed):
            break
    return events


# --- whole conversations -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_ends_with_both_sides_done(name: str) -> None:
    agent, collector, _, _ = live(CONVERSATIONS[name])
    assert agent.state is State.DONE
    assert collector.state is State.DONE


@pytest.mark.parametrize("side", [A, C], ids=lambda r: r.value)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_survives_a_split_at_every_offset(name: str, side: Role) -> None:
    """Whatever the peer's byte stream is cut into, ``side`` sees the same events."""
    script = CONVERSATIONS[name]
    _, _, agent_bytes, collector_bytes = live(script)
    stream = collector_bytes if side is A else agent_bytes
    for offset in range(len(stream) + 1):
        conn = replay(script, side, [stream[:offset], stream[offset:]])
        assert conn.state is State.DONE, f"split at {offset}"


@pytest.mark.parametrize("side", [A, C], ids=lambda r: r.value)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_conversation_survives_one_byte_at_a_time(name: str, side: Role) -> None:
    script = CONVERSATIONS[name]
    _, _, agent_bytes, collector_bytes = live(script)
    stream = collector_bytes if side is A else agent_bytes
    conn = replay(script, side, [stream[i : i + 1] for i in range(len(stream))])
    assert conn.state is State.DONE


def test_upload_states_follow_the_documented_machine() -> None:
    agent, collector = at(HANDSHAKE)
    assert (agent.state, collector.state) == (State.READY, State.READY)
    collector.receive_data(agent.send(BEGIN))
    assert collector.next_event() == BEGIN
    assert (agent.state, collector.state) == (State.UPLOADING, State.UPLOADING)
    collector.receive_data(agent.send(END))
    assert collector.next_event() == END
    assert (agent.state, collector.state) == (State.AWAIT_VERDICT, State.AWAIT_VERDICT)


def test_handshake_records_version_and_peer_data_cap() -> None:
    agent, collector = Connection(A, max_data=4096), Connection(C, max_data=8192)
    collector.receive_data(agent.send(agent.hello()))
    hello = collector.next_event()
    assert isinstance(hello, Hello)
    assert collector.peer_max_data == 4096
    version = collector.choose_version(hello)
    agent.receive_data(collector.send(collector.hello(version)))
    assert agent.next_event() == Hello(versions=(version,), max_data=8192)
    assert agent.version == collector.version == version
    assert agent.peer_max_data == 8192


def test_frames_buffered_before_eof_are_returned_before_closed() -> None:
    agent, collector = at(HANDSHAKE)
    collector.receive_data(agent.send(BEGIN) + agent.send(Data(b"x")) + agent.send(END))
    collector.receive_data(b"")
    assert drain(collector) == [BEGIN, Data(b"x"), END, Closed()]


# --- frames out of order -----------------------------------------------------------------

UPLOADING = [*HANDSHAKE, (A, BEGIN)]
AWAIT_VERDICT = [*UPLOADING, (A, END)]
DOWNLOADING = [*HANDSHAKE, (A, FETCH), (C, FETCH_META)]

OUT_OF_ORDER: dict[str, tuple[list[Step], Role, Event]] = {
    "data_before_begin": (HANDSHAKE, A, Data(b"x")),
    "end_before_begin": (HANDSHAKE, A, END),
    "begin_before_hello": ([], A, BEGIN),
    "data_before_hello": ([], A, Data(b"x")),
    "begin_before_collector_hello": ([(A, HELLO_A)], A, BEGIN),
    "agent_hello_twice": ([(A, HELLO_A)], A, HELLO_A),
    "agent_hello_after_handshake": (HANDSHAKE, A, HELLO_A),
    "collector_hello_first": ([], C, HELLO_C),
    "collector_hello_twice": (HANDSHAKE, C, HELLO_C),
    "collector_reject_before_hello": ([], C, Reject("busy", "full")),
    "end_twice": (AWAIT_VERDICT, A, END),
    "data_after_end": (AWAIT_VERDICT, A, Data(b"x")),
    "abort_after_end": (AWAIT_VERDICT, A, Abort("late")),
    "begin_twice": (UPLOADING, A, BEGIN),
    "report_during_upload": (UPLOADING, A, REPORT),
    "list_during_upload": (UPLOADING, A, ListRequest()),
    "stored_before_end": (UPLOADING, C, STORED),
    "collector_sends_begin": (HANDSHAKE, C, BEGIN),
    "collector_sends_data_during_upload": (UPLOADING, C, Data(b"x")),
    "collector_sends_end_during_upload": (UPLOADING, C, END),
    "agent_sends_stored": (AWAIT_VERDICT, A, STORED),
    "agent_sends_reject": (UPLOADING, A, Reject("protocol", "no")),
    "agent_sends_ack": ([*HANDSHAKE, (A, REPORT)], A, Ack()),
    "ack_without_report": (HANDSHAKE, C, Ack()),
    "ack_to_a_list": ([*HANDSHAKE, (A, ListRequest())], C, Ack()),
    "stored_in_reply_to_report": ([*HANDSHAKE, (A, REPORT)], C, STORED),
    "listing_without_list": (HANDSHAKE, C, LISTING),
    "fetch_meta_without_fetch": (HANDSHAKE, C, FETCH_META),
    "data_before_fetch_meta": ([*HANDSHAKE, (A, FETCH)], C, Data(b"x")),
    "fetch_meta_twice": (DOWNLOADING, C, FETCH_META),
    "agent_data_during_download": (DOWNLOADING, A, Data(b"x")),
    "agent_abort_during_download": (DOWNLOADING, A, Abort("stop")),
    "begin_after_stored": (CONVERSATIONS["upload"], A, BEGIN),
    "stored_twice": (CONVERSATIONS["upload"], C, STORED),
    "reject_after_stored": (CONVERSATIONS["upload"], C, Reject("internal", "late")),
    "data_after_abort": (CONVERSATIONS["abort"], A, Data(b"x")),
    "begin_after_abort": (CONVERSATIONS["abort"], A, BEGIN),
    "data_after_early_reject": (CONVERSATIONS["early_reject"], A, Data(b"x")),
    "end_after_early_reject": (CONVERSATIONS["early_reject"], A, END),
    "report_after_ack": (CONVERSATIONS["report"], A, REPORT),
    "data_after_fetch_end": (CONVERSATIONS["fetch"], C, Data(b"x")),
    "list_after_listing": (CONVERSATIONS["list"], A, ListRequest()),
}


@pytest.mark.parametrize("case", list(OUT_OF_ORDER))
def test_out_of_order_frame_is_a_local_error_for_the_sender(case: str) -> None:
    prefix, sender, event = OUT_OF_ORDER[case]
    agent, collector = at(prefix)
    conn = agent if sender is A else collector
    before = conn.state
    with pytest.raises(LocalProtocolError):
        conn.send(event)
    assert conn.state is before


@pytest.mark.parametrize("case", list(OUT_OF_ORDER))
def test_out_of_order_frame_is_a_remote_error_for_the_receiver(case: str) -> None:
    prefix, sender, event = OUT_OF_ORDER[case]
    agent, collector = at(prefix)
    receiver = collector if sender is A else agent
    receiver.receive_data(frame_of(event))
    with pytest.raises(RemoteProtocolError, match="not allowed") as caught:
        receiver.next_event()
    assert caught.value.reject_code is RejectCode.PROTOCOL


def test_refused_send_leaves_the_connection_usable() -> None:
    agent, collector = at(HANDSHAKE)
    with pytest.raises(LocalProtocolError):
        agent.send(Data(b"too early"))
    collector.receive_data(agent.send(BEGIN))
    assert collector.next_event() == BEGIN


def test_oversized_control_payload_is_refused_without_changing_state() -> None:
    """A LISTING over the control cap must not end the conversation: REJECT must still work."""
    agent, collector = at([*HANDSHAKE, (A, ListRequest())])
    huge = Listing(tuple({"name": "x" * 1000} for _ in range(MAX_CONTROL_PAYLOAD // 1000)))
    with pytest.raises(LocalProtocolError, match="control cap"):
        collector.send(huge)
    assert collector.state is State.AWAIT_LISTING
    agent.receive_data(collector.send(Reject("internal", "listing too large")))
    assert isinstance(agent.next_event(), Reject)


def test_oversized_control_payload_is_refused_locally() -> None:
    agent, _ = at(UPLOADING)
    with pytest.raises(LocalProtocolError, match="control cap"):
        agent.send(End(1, SHA, {"blob": "x" * MAX_CONTROL_PAYLOAD}))


# --- version negotiation -----------------------------------------------------------------


def test_choose_version_picks_the_highest_common_version() -> None:
    collector = Connection(C)
    offered = Hello(versions=(*PROTOCOL_VERSIONS, 99), max_data=4096)
    assert collector.choose_version(offered) == max(PROTOCOL_VERSIONS)


@pytest.mark.parametrize("versions", [(0,), (2,), (7, 8), (-1,), (2**40,)])
def test_choose_version_without_a_common_version_is_a_remote_error(
    versions: tuple[int, ...],
) -> None:
    collector = Connection(C)
    with pytest.raises(RemoteProtocolError, match="no common protocol version") as caught:
        collector.choose_version(Hello(versions=versions, max_data=4096))
    assert caught.value.reject_code is RejectCode.PROTOCOL


@pytest.mark.parametrize("versions", [(2,), (0,), (1, 2), (2, 1)])
def test_agent_refuses_a_collector_hello_it_cannot_speak(versions: tuple[int, ...]) -> None:
    agent = Connection(A)
    agent.send(agent.hello())
    agent.receive_data(frame_of(Hello(versions=versions, max_data=4096)))
    with pytest.raises(RemoteProtocolError, match="version"):
        agent.next_event()


def test_collector_hello_must_name_exactly_one_version() -> None:
    _, collector = at([(A, HELLO_A)])
    with pytest.raises(LocalProtocolError, match="exactly one version"):
        collector.send(Hello(versions=(1, 2), max_data=4096))
    assert collector.state is State.HELLO_SENT


def test_agent_hello_offers_every_version_it_speaks() -> None:
    assert Connection(A).hello() == Hello(versions=PROTOCOL_VERSIONS, max_data=DEFAULT_DATA_PAYLOAD)


@pytest.mark.parametrize("max_data", [0, MAX_DATA_PAYLOAD + 1])
@pytest.mark.parametrize("receiver_role", [A, C], ids=lambda r: r.value)
def test_hello_with_an_out_of_range_data_cap_is_a_remote_error(
    max_data: int, receiver_role: Role
) -> None:
    receiver = Connection(receiver_role)
    if receiver_role is A:
        receiver.send(receiver.hello())
    receiver.receive_data(frame_of(Hello(versions=(1,), max_data=max_data)))
    with pytest.raises(RemoteProtocolError, match="max_data"):
        receiver.next_event()


@pytest.mark.parametrize("max_data", [0, -1, MAX_DATA_PAYLOAD + 1])
def test_connection_refuses_an_out_of_range_own_data_cap(max_data: int) -> None:
    with pytest.raises(ValueError, match="max_data"):
        Connection(A, max_data=max_data)


# --- data caps ---------------------------------------------------------------------------


def capped_upload(collector_max: int) -> tuple[Connection, Connection]:
    agent, collector = Connection(A), Connection(C, max_data=collector_max)
    collector.receive_data(agent.send(agent.hello()))
    collector.next_event()
    agent.receive_data(collector.send(collector.hello(1)))
    agent.next_event()
    collector.receive_data(agent.send(BEGIN))
    collector.next_event()
    return agent, collector


def test_data_over_the_peer_cap_is_refused_locally() -> None:
    agent, _ = capped_upload(1000)
    with pytest.raises(LocalProtocolError, match="over the peer's 1000"):
        agent.send(Data(b"x" * 1001))
    assert agent.state is State.UPLOADING


def test_data_at_the_peer_cap_is_sent_and_received() -> None:
    agent, collector = capped_upload(1000)
    collector.receive_data(agent.send(Data(b"x" * 1000)))
    assert collector.next_event() == Data(b"x" * 1000)


def test_data_over_our_own_cap_is_a_remote_error_before_its_payload() -> None:
    _, collector = capped_upload(1000)
    collector.receive_data(HEADER.pack(FrameType.DATA, 1001))
    with pytest.raises(RemoteProtocolError) as caught:
        collector.next_event()
    assert caught.value.reject_code is RejectCode.TOO_LARGE


def test_collector_download_data_respects_the_agent_cap() -> None:
    agent, collector = Connection(A, max_data=512), Connection(C)
    collector.receive_data(agent.send(agent.hello()))
    collector.next_event()
    agent.receive_data(collector.send(collector.hello(1)))
    agent.next_event()
    collector.receive_data(agent.send(FETCH))
    collector.next_event()
    collector.send(FETCH_META)
    with pytest.raises(LocalProtocolError):
        collector.send(Data(b"y" * 513))
    assert len(collector.send(Data(b"y" * 512))) == 5 + 512


# --- end of file -------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 4, 5, 10])
def test_eof_in_the_middle_of_a_frame_is_a_remote_error(keep: int) -> None:
    collector = Connection(C)
    hello = frame_of(HELLO_A)
    collector.receive_data(hello[:keep])
    assert collector.next_event() is None
    collector.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        collector.next_event()


def test_eof_after_a_frame_with_a_partial_next_frame_is_a_remote_error() -> None:
    agent, collector = at(HANDSHAKE)
    collector.receive_data(agent.send(BEGIN) + agent.send(Data(b"abc"))[:-1])
    collector.receive_data(b"")
    assert collector.next_event() == BEGIN
    with pytest.raises(RemoteProtocolError):
        collector.next_event()


@pytest.mark.parametrize("prefix", [[], HANDSHAKE, UPLOADING], ids=["start", "ready", "upload"])
def test_eof_at_a_frame_boundary_yields_closed(prefix: list[Step]) -> None:
    _, collector = at(prefix)
    collector.receive_data(b"")
    assert collector.next_event() == Closed()
    assert collector.next_event() == Closed()


def test_no_event_until_bytes_or_eof_arrive() -> None:
    assert Connection(C).next_event() is None


# --- hostile input -----------------------------------------------------------------------


def feed_all(conn: Connection, chunks: list[bytes]) -> None:
    """Feed chunks then EOF, pulling events; only RemoteProtocolError may escape."""
    try:
        for chunk in chunks:
            if chunk:
                conn.receive_data(chunk)
            drain(conn)
        conn.receive_data(b"")
        drain(conn)
    except RemoteProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=0, max_value=2048))
def test_arbitrary_bytes_to_a_fresh_collector_raise_only_remote_errors(
    data: bytes, cut: int
) -> None:
    feed_all(Connection(C), [data[:cut], data[cut:]])


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_after_a_handshake_raise_only_remote_errors(data: bytes) -> None:
    _, collector = at(HANDSHAKE)
    feed_all(collector, [data])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
FIELD_NAMES = (
    "versions",
    "max_data",
    "software",
    "database",
    "engine",
    "format",
    "compression",
    "started_at",
    "size_estimate",
    "source",
    "byte_count",
    "sha256",
    "metadata",
    "reason",
    "name",
    "size",
    "code",
    "message",
    "at",
    "backups",
    "manifest",
)
OBJECTS = st.dictionaries(st.sampled_from(FIELD_NAMES), JSON, max_size=8)


def raw_payload(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.sampled_from(list(FrameType)), OBJECTS | JSON), min_size=1, max_size=4
    ),
    ready=st.booleans(),
)
def test_well_framed_hostile_json_raises_only_remote_errors(
    frames: list[tuple[FrameType, object]], ready: bool
) -> None:
    prefix = [*HANDSHAKE, (A, BEGIN)] if ready else []
    agent, collector = at(prefix)
    stream = b"".join(encode_frame(t, raw_payload(obj)) for t, obj in frames)
    feed_all(collector, [stream])
    feed_all(agent, [stream])


# --- field validation --------------------------------------------------------------------

HELLO_OK = {"versions": [1], "max_data": 4096, "software": "backhaul"}
BEGIN_OK = BEGIN.to_json()
END_OK = END.to_json()


def with_(base: dict[str, object], **changes: object) -> bytes:
    return json.dumps({**base, **changes}).encode()


def without(base: dict[str, object], key: str) -> bytes:
    return json.dumps({k: v for k, v in base.items() if k != key}).encode()


BAD_PAYLOADS: dict[str, tuple[FrameType, bytes]] = {
    "hello_versions_not_list": (FrameType.HELLO, with_(HELLO_OK, versions=1)),
    "hello_versions_empty": (FrameType.HELLO, with_(HELLO_OK, versions=[])),
    "hello_versions_17": (FrameType.HELLO, with_(HELLO_OK, versions=list(range(17)))),
    "hello_versions_bool": (FrameType.HELLO, with_(HELLO_OK, versions=[True])),
    "hello_versions_float": (FrameType.HELLO, with_(HELLO_OK, versions=[1.0])),
    "hello_versions_string": (FrameType.HELLO, with_(HELLO_OK, versions=["1"])),
    "hello_max_data_bool": (FrameType.HELLO, with_(HELLO_OK, max_data=True)),
    "hello_max_data_negative": (FrameType.HELLO, with_(HELLO_OK, max_data=-1)),
    "hello_max_data_string": (FrameType.HELLO, with_(HELLO_OK, max_data="4096")),
    "hello_max_data_huge": (FrameType.HELLO, with_(HELLO_OK, max_data=2**63)),
    "hello_max_data_missing": (FrameType.HELLO, without(HELLO_OK, "max_data")),
    "hello_software_too_long": (FrameType.HELLO, with_(HELLO_OK, software="s" * 129)),
    "hello_software_missing": (FrameType.HELLO, without(HELLO_OK, "software")),
    "begin_database_too_long": (FrameType.BEGIN, with_(BEGIN_OK, database="d" * 257)),
    "begin_database_int": (FrameType.BEGIN, with_(BEGIN_OK, database=5)),
    "begin_database_null": (FrameType.BEGIN, with_(BEGIN_OK, database=None)),
    "begin_engine_missing": (FrameType.BEGIN, without(BEGIN_OK, "engine")),
    "begin_engine_too_long": (FrameType.BEGIN, with_(BEGIN_OK, engine="e" * 33)),
    "begin_started_at_list": (FrameType.BEGIN, with_(BEGIN_OK, started_at=[])),
    "begin_size_estimate_negative": (FrameType.BEGIN, with_(BEGIN_OK, size_estimate=-1)),
    "begin_size_estimate_bool": (FrameType.BEGIN, with_(BEGIN_OK, size_estimate=False)),
    "begin_size_estimate_float": (FrameType.BEGIN, with_(BEGIN_OK, size_estimate=1.5)),
    "begin_source_too_long": (FrameType.BEGIN, with_(BEGIN_OK, source="s" * 257)),
    "end_byte_count_bool": (FrameType.END, with_(END_OK, byte_count=True)),
    "end_byte_count_negative": (FrameType.END, with_(END_OK, byte_count=-1)),
    "end_byte_count_missing": (FrameType.END, without(END_OK, "byte_count")),
    "end_sha256_not_hex": (FrameType.END, with_(END_OK, sha256="z" * 64)),
    "end_sha256_upper_case": (FrameType.END, with_(END_OK, sha256="AB" * 32)),
    "end_sha256_short": (FrameType.END, with_(END_OK, sha256="a" * 63)),
    "end_sha256_long": (FrameType.END, with_(END_OK, sha256="a" * 65)),
    "end_sha256_newline": (FrameType.END, with_(END_OK, sha256="a" * 63 + "\n")),
    "end_sha256_int": (FrameType.END, with_(END_OK, sha256=1)),
    "end_metadata_list": (FrameType.END, with_(END_OK, metadata=[])),
    "end_metadata_null": (FrameType.END, with_(END_OK, metadata=None)),
    "end_metadata_too_big": (FrameType.END, with_(END_OK, metadata={"x": "y" * MAX_META})),
    "abort_reason_too_long": (FrameType.ABORT, json.dumps({"reason": "r" * 1025}).encode()),
    "abort_reason_int": (FrameType.ABORT, b'{"reason":5}'),
    "stored_size_negative": (FrameType.STORED, b'{"name":"n","sha256":"s","size":-5}'),
    "stored_size_bool": (FrameType.STORED, b'{"name":"n","sha256":"s","size":true}'),
    "reject_code_too_long": (
        FrameType.REJECT,
        json.dumps({"code": "c" * 33, "reason": ""}).encode(),
    ),
    "report_message_missing": (FrameType.REPORT, b'{"reason":"dump"}'),
    "report_database_int": (FrameType.REPORT, b'{"reason":"r","message":"m","database":1}'),
    "list_database_list": (FrameType.LIST, b'{"database":["a"]}'),
    "listing_backups_missing": (FrameType.LISTING, b"{}"),
    "listing_backups_object": (FrameType.LISTING, b'{"backups":{}}'),
    "listing_backups_of_ints": (FrameType.LISTING, b'{"backups":[1]}'),
    "fetch_name_too_long": (
        FrameType.FETCH,
        json.dumps({"database": "d", "name": "n" * 513}).encode(),
    ),
    "fetch_meta_manifest_list": (FrameType.FETCH_META, b'{"name":"n","manifest":[]}'),
    "json_array": (FrameType.HELLO, b"[1]"),
    "json_string": (FrameType.BEGIN, b'"hello"'),
    "json_number": (FrameType.END, b"1"),
    "json_null": (FrameType.ACK, b"null"),
    "empty_payload": (FrameType.ACK, b""),
    "truncated_json": (FrameType.REPORT, b'{"reason":'),
    "invalid_utf8": (FrameType.ABORT, b'{"reason":"\xff"}'),
    "utf16": (FrameType.ACK, "{}".encode("utf-16")),
    "deep_nesting": (FrameType.END, b"[" * 60000),
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
def test_malformed_payload_is_a_remote_error(case: str) -> None:
    frame_type, payload = BAD_PAYLOADS[case]
    with pytest.raises(RemoteProtocolError) as caught:
        decode_payload(frame_type, payload)
    assert caught.value.reject_code is RejectCode.PROTOCOL


def test_malformed_payload_through_a_connection_is_a_remote_error() -> None:
    _, collector = at(UPLOADING)
    collector.receive_data(encode_frame(FrameType.END, with_(END_OK, byte_count=True)))
    with pytest.raises(RemoteProtocolError, match="byte_count"):
        collector.next_event()


def test_unknown_fields_are_ignored_and_optional_fields_may_be_null() -> None:
    payload = with_(BEGIN_OK, size_estimate=None, source=None, future_field={"x": 1})
    event = decode_payload(FrameType.BEGIN, payload)
    assert event == Begin(
        database="hospital",
        engine="mysql",
        format="sql",
        compression="zstd",
        started_at=BEGIN.started_at,
    )


def test_end_without_metadata_gets_an_empty_object() -> None:
    assert decode_payload(FrameType.END, without(END_OK, "metadata")) == End(9, SHA, {})


def test_data_payload_is_raw_bytes() -> None:
    assert decode_payload(FrameType.DATA, b"\xff\x00{") == Data(b"\xff\x00{")


@pytest.mark.parametrize(
    "event",
    [
        HELLO_A,
        BEGIN,
        END,
        Abort("r"),
        STORED,
        Reject("busy", "r"),
        REPORT,
        Ack(),
        ListRequest("hospital"),
        ListRequest(),
        LISTING,
        FETCH,
        FETCH_META,
        Begin(
            database="\u00fcn\u00ef",
            engine="mongodb",
            format="archive",
            compression="gzip",
            started_at="2026-11-26T01:30:00+00:00",
        ),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_event_round_trips_through_its_payload(event: Event) -> None:
    assert decode_payload(event.frame_type, encode_payload(event)) == event
