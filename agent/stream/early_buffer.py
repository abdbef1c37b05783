"""Compressed dump bytes made before the collector's channel is open.

The runner starts the dump tool at once and opens the channel (for a run's first
backup, the SSH connection too) at the same time. What the dump makes meanwhile
waits here, up to :data:`HOLD_LIMIT` bytes; then sending waits for the channel, the
pump's hand-over fills and the dump tool blocks, as with a slow link. A one-shot
``backhaul-agent backup`` spends a fifth of a second importing the SSH stack and
connecting: about two per cent of a 1 GB backup, which the dump now does meanwhile.

A blocked dump tool keeps its snapshot open and the table it is in locked against DDL
(an ALTER waits, and every query on that table queues behind it). When the collector
is down the connection is retried for half a minute or more, so a full early buffer
waits at most :data:`PATIENCE` seconds for the channel, then raises
:class:`ChannelLate`: the runner stops that dump and starts it again once connected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from common.errors import BackhaulError

HOLD_LIMIT = 8 * 1024 * 1024  # compressed bytes held while the channel opens
PATIENCE = 5.0  # seconds a full early buffer waits for the channel before giving up

C = TypeVar("C")


class ChannelLate(Exception):
    """The early buffer is full and the channel is still not open: stop the dump."""


class EarlyBuffer(Generic[C]):
    """Holds ``send`` calls until ``opening`` gives a channel, then sends in order.

    An ``opening`` that fails raises its error from the next :meth:`send` (or from
    :meth:`channel`); what was held is dropped with it. An ``opening`` still not done
    ``patience`` seconds after the held bytes reached ``limit`` makes :meth:`send` raise
    :class:`ChannelLate` (``opening`` is left to go on).
    """

    def __init__(self, opening: asyncio.Future[C],
                 send: Callable[[C, bytes], Awaitable[None]], limit: int = HOLD_LIMIT,
                 patience: float = PATIENCE) -> None:
        self._opening = opening
        self._send = send
        self._limit = limit
        self._patience = patience
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._channel: C | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes waiting for the channel."""
        return self._held_bytes

    async def send(self, data: bytes) -> None:
        """Send ``data`` on the channel, or hold it while the channel opens.

        Raises:
            ChannelLate: the held bytes are at the limit and the channel has not
                opened within ``patience`` seconds.
            Whatever opening the channel or sending raised.
        """
        if self._channel is None:
            if not self._opening.done() and self._held_bytes + len(data) <= self._limit:
                self._held.append(data)
                self._held_bytes += len(data)
                return
            await asyncio.wait({self._opening}, timeout=self._patience)
            if not self._opening.done():
                raise ChannelLate(
                    f"no channel to the collector after {self._patience:g} s "
                    f"with {self._held_bytes} bytes held"
                )
            await self.channel()
        assert self._channel is not None
        await self._send(self._channel, data)

    async def channel(self) -> C:
        """The open channel, once everything held has been sent on it.

        Raises:
            Whatever opening the channel raised, or what sending the held bytes raised.
        """
        if self._channel is None:
            channel = await asyncio.shield(self._opening)
            while self._held:
                data = self._held.pop(0)
                self._held_bytes -= len(data)
                await self._send(channel, data)
            self._channel = channel
        return self._channel

    def drop(self) -> None:
        """Forget what is held: the dump that made it was stopped (:class:`ChannelLate`)."""
        self._held.clear()
        self._held_bytes = 0

    async def opened(self) -> C | None:
        """The channel if it opens, without sending what is held; None if opening it
        failed with one of Backhaul's errors (anything else propagates)."""
        try:
            return await asyncio.shield(self._opening)
        except BackhaulError:
            return None
