"""Flow control of one channel: the inbox that pauses a fast agent, the rate floor that
cuts off a slow one, and the error for a channel that went away.
"""

from __future__ import annotations

import asyncio
from collections import deque

import asyncssh

from common.errors import RemoteProtocolError, TransportError

HIGH_WATER = 4 * 1024 * 1024  # queued bytes before we stop reading the channel
LOW_WATER = 1024 * 1024


class ChannelClosed(TransportError):
    """The channel closed or the connection dropped before the request was done."""


class Inbox:
    """Bytes received on the channel, with flow control by pausing the channel.

    Items are bytes, b"" for the agent's EOF and None once the connection is lost.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        self._items: deque[bytes | None] = deque()
        self._ready = asyncio.Event()
        self._queued = 0
        self._paused = False
        self.held_back = False  # paused at some time since the rate floor last looked

    def put(self, data: bytes | None) -> None:
        self._items.append(data)
        self._ready.set()
        if data:
            self._queued += len(data)
            if self._queued > HIGH_WATER and not self._paused:
                self._paused = True
                self.held_back = True
                self._chan.pause_reading()

    async def get(self) -> bytes | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._take()

    def get_nowait(self) -> bytes | None:
        """Bytes (or the EOF mark) already queued; None if there are none. A lost
        connection is left for :meth:`get` to report."""
        if not self._items or self._items[0] is None:
            return None
        return self._take()

    def _take(self) -> bytes | None:
        data = self._items.popleft()
        if data:
            self._queued -= len(data)
            if self._paused and self._queued < LOW_WATER:
                self._paused = False
                self._chan.resume_reading()
        return data

    @property
    def paused(self) -> bool:
        """True while we hold the agent back because our own queue is full."""
        return self._paused


class RateFloor:
    """Cuts off an upload that trickles: every window must average ``rate`` bytes/s.

    A window in which the collector itself held the agent back (reading paused) at
    any time is not held against the agent.
    """

    def __init__(self, rate: int, window: float, now: float, received: int) -> None:
        self.rate = rate
        self.window = window
        self.next_check = now + window
        self._since = now
        self._mark = received

    def check(self, received: int, now: float, held_back: bool) -> bool:
        """Judge the window if it is over; True when a new one starts.

        Raises:
            RemoteProtocolError: too slow (reject code ``protocol``).
        """
        if now < self.next_check:
            return False
        got, elapsed = received - self._mark, now - self._since
        if not held_back and got < self.rate * elapsed:
            raise RemoteProtocolError(
                f"upload too slow: {got} bytes in {elapsed:.0f} s "
                f"(at least {self.rate} bytes/s required)"
            )
        self._since, self._mark, self.next_check = now, received, now + self.window
        return True
