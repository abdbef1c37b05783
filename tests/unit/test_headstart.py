"""The head start: compressed bytes made while the collector's channel opens."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.stream.early_buffer import ChannelLate, EarlyBuffer
from common.errors import RejectedError


class Channel:
    """Records what is sent on it, in order."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []


async def record(channel: Channel, data: bytes) -> None:
    channel.sent.append(data)


class Opening(asyncio.Future[Channel]):
    """The channel being opened; ``awaited`` is set once something waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = asyncio.Event()

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self.awaited.set()  # asyncio.wait and shield wait through a done callback
        super().add_done_callback(fn, context=context)


async def test_bytes_made_before_the_channel_opens_go_out_first_and_in_order() -> None:
    opened: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
    gate = EarlyBuffer(asyncio.ensure_future(opened), record, limit=100)

    await gate.send(b"one")
    await gate.send(b"two")
    assert gate.held_bytes == 6

    channel = Channel()
    opened.set_result(channel)
    await gate.send(b"three")

    assert channel.sent == [b"one", b"two", b"three"]
    assert gate.held_bytes == 0
    assert await gate.channel() is channel


async def test_sending_waits_for_the_channel_once_the_limit_is_reached() -> None:
    opened = Opening()
    gate = EarlyBuffer(opened, record, limit=10)
    await gate.send(b"x" * 8)
    assert not opened.awaited.is_set(), "8 bytes fit in the head start"

    blocked = asyncio.create_task(gate.send(b"y" * 8))
    await asyncio.wait_for(opened.awaited.wait(), 5)
    assert not blocked.done(), "16 bytes exceed the 10-byte head start"
    assert gate.held_bytes == 8

    channel = Channel()
    opened.set_result(channel)
    await asyncio.wait_for(blocked, 5)
    assert channel.sent == [b"x" * 8, b"y" * 8]


async def test_a_full_head_start_gives_up_after_its_patience_and_leaves_opening_running() -> None:
    """The collector is down: the dump must stop rather than hold its snapshot and its
    table lock while the connection is retried."""
    opened: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
    opening = asyncio.ensure_future(opened)
    # The patience is what is tested: the send must give up once it has run out.
    gate = EarlyBuffer(opening, record, limit=10, patience=0.1)
    await gate.send(b"x" * 8)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ChannelLate, match=r"after 0\.1 s with 8 bytes held"):
        await gate.send(b"y" * 8)
    assert asyncio.get_running_loop().time() - started >= 0.1
    assert not opening.done(), "the connection goes on being made"
    channel = Channel()
    opened.set_result(channel)
    again = EarlyBuffer(opening, record, limit=10, patience=0.1)  # the dump, started anew
    await again.send(b"z")
    assert channel.sent == [b"z"], "what the stopped dump made is dropped"


async def test_a_dump_that_ends_within_the_head_start_is_sent_when_the_channel_opens() -> None:
    opened = Opening()
    gate = EarlyBuffer(opened, record, limit=100)
    await gate.send(b"whole dump")

    waiting = asyncio.create_task(gate.channel())
    await asyncio.wait_for(opened.awaited.wait(), 5)
    assert not waiting.done()
    channel = Channel()
    opened.set_result(channel)
    assert await asyncio.wait_for(waiting, 5) is channel
    assert channel.sent == [b"whole dump"]


async def test_a_channel_that_cannot_open_fails_the_next_send_and_drops_what_was_held() -> None:
    refused = asyncio.Event()

    async def refuse() -> Channel:
        await refused.wait()
        raise RejectedError("busy", "too many uploads")

    opening = asyncio.create_task(refuse())
    gate = EarlyBuffer(opening, record, limit=100)
    await gate.send(b"early")
    assert gate.held_bytes == 5
    refused.set()
    await asyncio.wait({opening}, timeout=5)
    assert opening.done()

    with pytest.raises(RejectedError, match="busy"):
        await gate.send(b"late")
    with pytest.raises(RejectedError, match="busy"):
        await gate.channel()
    assert await gate.opened() is None


async def test_opened_gives_the_channel_without_sending_what_is_held() -> None:
    channel = Channel()

    async def open_channel() -> Channel:
        return channel

    gate = EarlyBuffer(asyncio.create_task(open_channel()), record, limit=100)
    await gate.send(b"held")
    assert await gate.opened() is channel
    assert channel.sent == [], "an ABORT after a failed dump must not follow its bytes"
