"""Wire framing: a type byte, a 4-byte big-endian length, a payload; nothing else.

The decoder never trusts a length: a header that announces more than the cap for its
frame type is refused as soon as its five bytes have arrived, before any payload is
buffered, so a hostile peer cannot make us allocate more than one capped frame.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from common.errors import RejectCode, RemoteProtocolError

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size

# Hard caps. A control payload is a small JSON object; 64 KiB leaves room for a
# manifest-sized END but not for abuse. Data frames are negotiated below this ceiling.
MAX_CONTROL_PAYLOAD = 64 * 1024
MAX_DATA_PAYLOAD = 1024 * 1024
DEFAULT_DATA_PAYLOAD = 256 * 1024


class FrameType(enum.IntEnum):
    """Every frame type the protocol knows; anything else is a protocol error."""

    HELLO = 0x01
    BEGIN = 0x10
    DATA = 0x11
    END = 0x12
    ABORT = 0x13
    STORED = 0x20
    REJECT = 0x21
    REPORT = 0x30
    ACK = 0x31
    LIST = 0x40
    LISTING = 0x41
    FETCH = 0x42
    FETCH_META = 0x43


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its type and its raw payload."""

    type: FrameType
    payload: bytes


def encode_frame(frame_type: FrameType, payload: bytes) -> bytes:
    """Return the bytes of one frame; the caller has already checked the caps."""
    return HEADER.pack(frame_type, len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames, refusing unknown types and oversized lengths.

    ``data_cap`` is the largest DATA payload this side accepts (it announced it in its
    HELLO); every other frame type is capped at ``MAX_CONTROL_PAYLOAD``.
    """

    def __init__(self, data_cap: int = DEFAULT_DATA_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._data_cap = data_cap

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: unknown frame type or a length over its cap.
        """
        if len(self._buffer) < HEADER_SIZE:
            return None
        type_byte, length = HEADER.unpack_from(self._buffer)
        try:
            frame_type = FrameType(type_byte)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type 0x{type_byte:02x}") from None
        cap = self._data_cap if frame_type is FrameType.DATA else MAX_CONTROL_PAYLOAD
        if length > cap:
            raise RemoteProtocolError(
                f"{frame_type.name} frame of {length} bytes exceeds the cap of {cap}",
                RejectCode.TOO_LARGE,
            )
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:  # one copy, not a slice and then bytes()
            payload = bytes(view[HEADER_SIZE:end])
        del self._buffer[:end]
        return Frame(frame_type, payload)
