"""The Backhaul channel state machine, sans-io: bytes in, events out; events in, bytes out.

One SSH channel carries one conversation. Both sides run the same machine and track
the same state; each side's ``send`` is checked as strictly as what it receives, so a
bug on our side is a LocalProtocolError and a misbehaving peer a RemoteProtocolError.

    START --agent HELLO--> HELLO_SENT --collector HELLO--> READY
    READY --BEGIN--> UPLOADING --DATA*--> --END--> AWAIT_VERDICT --STORED|REJECT--> DONE
                               --ABORT--> DONE          (collector may REJECT early)
    READY --REPORT--> AWAIT_ACK --ACK|REJECT--> DONE
    READY --LIST--> AWAIT_LISTING --LISTING|REJECT--> DONE
    READY --FETCH--> AWAIT_FETCH --FETCH_META--> DOWNLOADING --DATA*--> --END--> DONE
    a REJECT from the collector ends the conversation in any state after START.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.errors import LocalProtocolError, RejectCode, RemoteProtocolError
from common.events import (
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
    MAX_DATA_PAYLOAD,
    FrameDecoder,
    encode_frame,
)

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
SUBSYSTEM = "backhaul"


class Role(enum.Enum):
    AGENT = "agent"
    COLLECTOR = "collector"


class State(enum.Enum):
    START = "start"
    HELLO_SENT = "hello_sent"
    READY = "ready"
    UPLOADING = "uploading"
    AWAIT_VERDICT = "await_verdict"
    AWAIT_ACK = "await_ack"
    AWAIT_LISTING = "await_listing"
    AWAIT_FETCH = "await_fetch"
    DOWNLOADING = "downloading"
    DONE = "done"


_A, _C = Role.AGENT, Role.COLLECTOR

# (state, sender, event type) -> next state. Anything not listed is a protocol error.
_TRANSITIONS: dict[tuple[State, Role, type[Event]], State] = {
    (State.START, _A, Hello): State.HELLO_SENT,
    (State.HELLO_SENT, _C, Hello): State.READY,
    (State.READY, _A, Begin): State.UPLOADING,
    (State.READY, _A, Report): State.AWAIT_ACK,
    (State.READY, _A, ListRequest): State.AWAIT_LISTING,
    (State.READY, _A, Fetch): State.AWAIT_FETCH,
    (State.UPLOADING, _A, Data): State.UPLOADING,
    (State.UPLOADING, _A, End): State.AWAIT_VERDICT,
    (State.UPLOADING, _A, Abort): State.DONE,
    (State.AWAIT_VERDICT, _C, Stored): State.DONE,
    (State.AWAIT_ACK, _C, Ack): State.DONE,
    (State.AWAIT_LISTING, _C, Listing): State.DONE,
    (State.AWAIT_FETCH, _C, FetchMeta): State.DOWNLOADING,
    (State.DOWNLOADING, _C, Data): State.DOWNLOADING,
    (State.DOWNLOADING, _C, End): State.DONE,
}


@dataclass(frozen=True)
class Closed(Event):
    """The peer closed its side of the channel (EOF); not a frame."""


class Connection:
    """One side of one channel's conversation.

    ``receive_data`` buffers bytes; ``next_event`` returns the next event or None when
    more bytes are needed. ``send`` returns the bytes to write for an event.
    """

    def __init__(self, role: Role, max_data: int = DEFAULT_DATA_PAYLOAD) -> None:
        if not 0 < max_data <= MAX_DATA_PAYLOAD:
            raise ValueError(f"max_data must be in 1..{MAX_DATA_PAYLOAD}")
        self.role = role
        self.state = State.START
        self.version: int | None = None
        self.peer_max_data = DEFAULT_DATA_PAYLOAD
        self._max_data = max_data
        self._decoder = FrameDecoder(max_data)
        self._eof = False

    @property
    def peer_role(self) -> Role:
        return Role.COLLECTOR if self.role is Role.AGENT else Role.AGENT

    def send(self, event: Event) -> bytes:
        """Return the bytes of ``event`` after checking we may send it now.

        Raises:
            LocalProtocolError: the event is not allowed in this state or over a cap.
        """
        if isinstance(event, Data) and len(event.payload) > self.peer_max_data:
            raise LocalProtocolError(
                f"DATA payload of {len(event.payload)} bytes over the peer's "
                f"{self.peer_max_data}"
            )
        if isinstance(event, Hello) and self.role is Role.COLLECTOR and len(event.versions) != 1:
            raise LocalProtocolError("the collector's HELLO names exactly one version")
        payload = encode_payload(event)  # may refuse; the state must not move first
        self.state = self._advance(self.role, event, LocalProtocolError)
        if isinstance(event, Hello) and self.role is Role.COLLECTOR:
            self.version = event.versions[0]
        return encode_frame(event.frame_type, payload)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the peer; b"" means the peer sent EOF."""
        if data:
            self._decoder.feed(data)
        else:
            self._eof = True

    def next_event(self) -> Event | None:
        """Return the next event from the peer, Closed at EOF, or None if more is needed.

        Raises:
            RemoteProtocolError: a malformed, oversized or out-of-order frame, or EOF
                while a frame was half received.
        """
        frame = self._decoder.next_frame()
        if frame is None:
            if not self._eof:
                return None
            if self._decoder.buffered:
                raise RemoteProtocolError("channel closed in the middle of a frame")
            return Closed()
        event = decode_payload(frame.type, frame.payload)
        self.state = self._advance(self.peer_role, event, RemoteProtocolError)
        if isinstance(event, Hello):
            self._accept_hello(event)
        return event

    def _accept_hello(self, hello: Hello) -> None:
        if not 0 < hello.max_data <= MAX_DATA_PAYLOAD:
            raise RemoteProtocolError(f"HELLO max_data {hello.max_data} is out of range")
        self.peer_max_data = hello.max_data
        if self.role is Role.AGENT:
            if len(hello.versions) != 1 or hello.versions[0] not in PROTOCOL_VERSIONS:
                raise RemoteProtocolError(f"collector chose unsupported version {hello.versions}")
            self.version = hello.versions[0]

    def choose_version(self, hello: Hello) -> int:
        """Collector side: the highest version both sides speak.

        Raises:
            RemoteProtocolError: no common version (reject code ``protocol``).
        """
        common = set(hello.versions) & set(PROTOCOL_VERSIONS)
        if not common:
            raise RemoteProtocolError(
                f"no common protocol version: agent offers {sorted(hello.versions)[:16]}, "
                f"collector speaks {list(PROTOCOL_VERSIONS)}"
            )
        return max(common)

    def hello(self, version: int | None = None) -> Hello:
        """The HELLO this side sends: all our versions (agent) or the chosen one."""
        versions = PROTOCOL_VERSIONS if version is None else (version,)
        return Hello(versions=versions, max_data=self._max_data)

    def _advance(
        self,
        sender: Role,
        event: Event,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> State:
        if isinstance(event, Reject):
            if sender is Role.COLLECTOR and self.state not in (State.START, State.DONE):
                return State.DONE
        else:
            next_state = _TRANSITIONS.get((self.state, sender, type(event)))
            if next_state is not None:
                return next_state
        message = (
            f"{event.frame_type.name} from the {sender.value} is not allowed "
            f"in state {self.state.value}"
        )
        if error is RemoteProtocolError:
            raise RemoteProtocolError(message, RejectCode.PROTOCOL)
        raise LocalProtocolError(message)
