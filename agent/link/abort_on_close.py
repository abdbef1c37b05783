"""The collector client whose uploads, interrupted, end in ABORT rather than silence.

Both ``backhaul-agent backup`` and the service use it: a channel closed in the middle of
an upload (the agent stopping, Ctrl-C) sends ABORT first, and closing the
client lets those ABORTs reach the collector, so it records why and keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncssh

from agent.link.connection import Channel, CollectorClient
from common.errors import BackhaulError
from common.events import Abort
from common.protocol import State

log = logging.getLogger(__name__)
CLOSE_GRACE = 15.0  # a slow link may hold several MiB ahead of the ABORT; systemd allows 120 s


class AbortOnCloseChannel(Channel):
    """A channel that, closed in the middle of an upload, sends ABORT before it goes."""

    def __init__(
        self,
        writer: asyncssh.SSHWriter[bytes],
        reader: asyncssh.SSHReader[bytes],
        client: AbortOnCloseClient,
    ) -> None:
        super().__init__(writer, reader)
        self._client = client
        self._ssh_channel = writer.channel

    def close(self) -> None:
        if self.protocol.state is State.UPLOADING:
            # A frame is written whole or not at all, so ABORT may follow any DATA.
            with contextlib.suppress(BackhaulError, asyncssh.Error, OSError):
                abort = Abort(self._client.abort_reason, "interrupted")
                self._ssh_channel.write(self.protocol.send(abort))
                log.info("upload interrupted: ABORT sent (%s)", self._client.abort_reason)
        super().close()

    async def wait_closed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            async with asyncio.timeout(timeout):
                await self._ssh_channel.wait_closed()


class AbortOnCloseClient(CollectorClient):
    """A collector client whose interrupted uploads end in ABORT, flushed before closing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abort_reason = "backup interrupted on the agent"
        self._channels: set[AbortOnCloseChannel] = set()

    async def channel(self) -> Channel:
        """As :meth:`CollectorClient.channel`, with ABORT on an interrupted upload.

        Raises:
            TransportError: the channel cannot be opened.
            RejectedError: the collector refused (busy, version).
        """
        writer, reader = await self.open_session()
        channel = AbortOnCloseChannel(writer, reader, self)
        self._channels.add(channel)
        await channel.handshake()
        return channel

    async def close(self) -> None:
        """Let closing channels deliver what they still hold (an ABORT), then disconnect."""
        channels, self._channels = self._channels, set()
        if channels:
            await asyncio.gather(*(c.wait_closed(CLOSE_GRACE) for c in channels))
        await super().close()
