"""Tests for the wire framing: round trips, arbitrary splits, unknown types and caps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import RejectCode, RemoteProtocolError
from common.frames import (
    DEFAULT_DATA_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)

SAMPLE_FRAMES = (
    Frame(FrameType.HELLO, b'{"versions":[1],"max_data":262144,"software":"backhaul"}'),
    Frame(FrameType.BEGIN, b'{"database":"hospital"}'),
    Frame(FrameType.DATA, bytes(range(256)) * 3),
    Frame(FrameType.DATA, b""),
    Frame(FrameType.END, b"{}"),
    Frame(FrameType.STORED, b'{"name":"hospital_20261126.sql.zst"}'),
)
STREAM = b"".join(encode_frame(f.type, f.payload) for f in SAMPLE_FRAMES)
UNKNOWN_TYPES = sorted(set(range(256)) - {int(t) for t in FrameType})


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def decode_in_chunks(chunks: list[bytes]) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frames.extend(drain(decoder))
    assert decoder.buffered == 0
    return frames


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=lambda f: f.type.name)
def test_encoded_frame_decodes_to_the_same_frame(frame: Frame) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame.type, frame.payload))
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_encoded_header_is_type_byte_then_big_endian_length() -> None:
    assert encode_frame(FrameType.END, b"abc") == b"\x12\x00\x00\x00\x03abc"


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_every_known_frame_type_decodes(frame_type: FrameType) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame_type, b"{}"))
    assert decoder.next_frame() == Frame(frame_type, b"{}")


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    assert decode_in_chunks([STREAM]) == list(SAMPLE_FRAMES)


def test_stream_split_at_every_offset_yields_the_same_frames() -> None:
    for offset in range(len(STREAM) + 1):
        frames = decode_in_chunks([STREAM[:offset], STREAM[offset:]])
        assert frames == list(SAMPLE_FRAMES), f"split at {offset}"


def test_stream_fed_one_byte_at_a_time_yields_the_same_frames() -> None:
    chunks = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert decode_in_chunks(chunks) == list(SAMPLE_FRAMES)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_stream_split_at_any_set_of_offsets_yields_the_same_frames(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode_in_chunks(chunks) == list(SAMPLE_FRAMES)


def test_partial_frame_waits_and_counts_as_buffered() -> None:
    decoder = FrameDecoder()
    encoded = encode_frame(FrameType.DATA, b"payload")
    decoder.feed(encoded[:-1])
    assert decoder.next_frame() is None
    assert decoder.buffered == len(encoded) - 1
    decoder.feed(encoded[-1:])
    assert decoder.next_frame() == Frame(FrameType.DATA, b"payload")
    assert decoder.buffered == 0


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("type_byte", [0x00, 0x02, 0x14, 0x22, 0x44, 0xFF])
def test_decoder_rejects_unknown_frame_type(type_byte: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(type_byte, 0))
    with pytest.raises(RemoteProtocolError, match="unknown frame type") as caught:
        decoder.next_frame()
    assert caught.value.reject_code is RejectCode.PROTOCOL


def test_decoder_rejects_every_unknown_frame_type() -> None:
    for type_byte in UNKNOWN_TYPES:
        decoder = FrameDecoder()
        decoder.feed(HEADER.pack(type_byte, 2) + b"{}")
        with pytest.raises(RemoteProtocolError):
            decoder.next_frame()


def test_unknown_type_is_rejected_after_a_good_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.ACK, b"{}") + HEADER.pack(0x7F, 0))
    assert decoder.next_frame() == Frame(FrameType.ACK, b"{}")
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_oversized_length_is_rejected_when_the_fifth_header_byte_arrives() -> None:
    """No payload byte is needed: the header alone condemns the frame."""
    decoder = FrameDecoder()
    header = HEADER.pack(FrameType.HELLO, 0xFFFFFFFF)
    decoder.feed(header[:4])
    assert decoder.next_frame() is None
    decoder.feed(header[4:])
    assert decoder.buffered == HEADER_SIZE
    with pytest.raises(RemoteProtocolError, match="exceeds the cap") as caught:
        decoder.next_frame()
    assert caught.value.reject_code is RejectCode.TOO_LARGE


def test_oversized_data_frame_is_rejected_before_its_payload() -> None:
    decoder = FrameDecoder(data_cap=1000)
    decoder.feed(HEADER.pack(FrameType.DATA, 1001))
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.reject_code is RejectCode.TOO_LARGE


def test_data_frame_at_exactly_the_data_cap_is_accepted() -> None:
    decoder = FrameDecoder(data_cap=1000)
    decoder.feed(encode_frame(FrameType.DATA, b"x" * 1000))
    frame = decoder.next_frame()
    assert frame is not None
    assert len(frame.payload) == 1000


def test_control_frame_at_exactly_the_control_cap_is_accepted() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.LISTING, b" " * MAX_CONTROL_PAYLOAD))
    frame = decoder.next_frame()
    assert frame is not None
    assert len(frame.payload) == MAX_CONTROL_PAYLOAD


@pytest.mark.parametrize("frame_type", [t for t in FrameType if t is not FrameType.DATA])
def test_control_frame_over_the_control_cap_is_rejected(frame_type: FrameType) -> None:
    decoder = FrameDecoder(data_cap=MAX_DATA_PAYLOAD)
    decoder.feed(HEADER.pack(frame_type, MAX_CONTROL_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.reject_code is RejectCode.TOO_LARGE


def test_data_cap_applies_to_data_frames_only() -> None:
    """A DATA frame larger than the control cap passes when the data cap allows it."""
    size = MAX_CONTROL_PAYLOAD * 2
    decoder = FrameDecoder(data_cap=MAX_DATA_PAYLOAD)
    decoder.feed(encode_frame(FrameType.DATA, b"d" * size))
    frame = decoder.next_frame()
    assert frame is not None
    assert len(frame.payload) == size
    decoder.feed(HEADER.pack(FrameType.END, size))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_small_data_cap_does_not_shrink_the_control_cap() -> None:
    decoder = FrameDecoder(data_cap=16)
    decoder.feed(encode_frame(FrameType.END, b"e" * 1024))
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.type is FrameType.END


def test_default_data_cap_is_the_default_payload() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(FrameType.DATA, DEFAULT_DATA_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()
