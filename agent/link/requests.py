"""What the agent asks of the collector besides an upload: LIST, FETCH and REPORT.

A FETCH is checked while it streams against the manifest that FETCH_META carries (the
size and SHA-256 recorded when the backup was stored) and against END: more bytes than
the manifest's size stop it at once, and a wrong count or digest at the end is an
:class:`~common.errors.IntegrityError`. :class:`ServiceClient` is the collector client
for long-running and interactive use: a channel closed in the middle of an upload (the
agent stopping, Ctrl-C) sends ABORT first, so the collector records why and keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncssh

from agent.link.connection import Channel, CollectorClient
from agent.link.retry import retry
from common.errors import (
    BackhaulError,
    CollectorTrustError,
    IntegrityError,
    RejectCode,
    RejectedError,
    RemoteProtocolError,
    TransportError,
)
from common.events import SHA256_RE, Abort, Ack, Data, End, FetchMeta, Listing, ListRequest, Report
from common.events import Fetch as FetchRequest
from common.logsetup import escape_control
from common.protocol import State

log = logging.getLogger(__name__)
ANSWER_TIMEOUT = 120.0
FETCH_IDLE_TIMEOUT = 300.0
CLOSE_GRACE = 15.0  # a slow link may hold several MiB ahead of the ABORT; systemd allows 120 s


async def list_backups(client: CollectorClient, database: str) -> list[dict[str, Any]]:
    """The collector's summaries of this agent's backups of ``database``, oldest first.

    Raises:
        TransportError, RejectedError, RemoteProtocolError: the request failed.
    """
    channel = await client.channel()
    try:
        await channel.send(ListRequest(database))
        listing = await channel.expect(Listing, timeout=ANSWER_TIMEOUT)
        assert isinstance(listing, Listing)
        return [dict(b) for b in listing.backups]
    finally:
        channel.close()


@dataclass(frozen=True)
class Fetched:
    """A backup received in full and proven equal to what the collector stored."""

    name: str
    manifest: dict[str, Any]
    byte_count: int
    sha256: str


async def fetch(
    client: CollectorClient,
    database: str,
    name: str,
    sink: Callable[[bytes], Awaitable[None]],
    *,
    progress: Callable[[int], None] | None = None,
) -> Fetched:
    """Stream the stored backup ``name`` of ``database`` into ``sink``, verifying it.

    ``sink`` receives the stored (compressed) bytes in order; the caller decides what a
    chunk is worth before the end proves the whole.

    Raises:
        IntegrityError: size or SHA-256 differ from the manifest or from END.
        TransportError, RejectedError, RemoteProtocolError: the request failed.
        Whatever ``sink`` raises.
    """
    channel = await client.channel()
    try:
        await channel.send(FetchRequest(database, name))
        meta = await channel.expect(FetchMeta, timeout=ANSWER_TIMEOUT)
        assert isinstance(meta, FetchMeta)
        expected_size, expected_sha = _expected(meta, name)
        digest = hashlib.sha256()
        count = 0
        while True:
            event = await channel.expect(Data, End, timeout=FETCH_IDLE_TIMEOUT)
            if isinstance(event, End):
                break
            assert isinstance(event, Data)
            count += len(event.payload)
            if count > expected_size:
                raise IntegrityError(
                    f"{name}: the collector sent more than the {expected_size} bytes its "
                    "manifest records"
                )
            digest.update(event.payload)
            await sink(event.payload)
            if progress is not None:
                progress(len(event.payload))
        _check_end(name, event, count, digest.hexdigest(), expected_size, expected_sha)
        return Fetched(meta.name, meta.manifest, count, expected_sha)
    finally:
        channel.close()


def _expected(meta: FetchMeta, name: str) -> tuple[int, str]:
    if meta.name != name:
        raise RemoteProtocolError(f"asked for {name!r}, the collector sent {meta.name!r}")
    size, sha = meta.manifest.get("size"), meta.manifest.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IntegrityError(f"{name}: its manifest records no size")
    if not isinstance(sha, str) or not SHA256_RE.match(sha):
        raise IntegrityError(f"{name}: its manifest records no SHA-256")
    return size, sha


def _check_end(name: str, end: End, count: int, digest: str, size: int, sha: str) -> None:
    if count != size or end.byte_count != count:
        raise IntegrityError(
            f"{name}: received {count} bytes, the manifest records {size} and END "
            f"says {end.byte_count}; the stored file is damaged or was changed"
        )
    if digest != sha or end.sha256 != sha:
        raise IntegrityError(
            f"{name}: SHA-256 of the received bytes is {digest}, the manifest records "
            f"{sha}; the stored file is damaged or was changed"
        )


async def send_report(
    client: CollectorClient,
    *,
    kind: str,
    reason: str,
    message: str,
    database: str | None,
    source: str | None,
) -> None:
    """Tell the collector about a failure or a drill's result; waits for its ACK.

    A report lost on the way (collector unreachable, connection broken, busy) is sent
    again on a new connection, with backoff (``[collector] retries``, ``retry_backoff``);
    one the collector will not have (keys not trusted, another REJECT) is not.

    Raises:
        TransportError, RejectedError, RemoteProtocolError: the report did not arrive.
    """
    report = Report(
        reason=reason[:64],
        message=message[:1000],
        database=database,
        source=source,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        kind=kind,
    )
    what = "the failure" if kind == "failure" else "the drill"
    label = f"{source or '*'}/{escape_control(database or '*')}"
    attempts = 0

    async def send() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            await client.reconnect()
        await _deliver(client, report)

    await retry(send, client.retry_policy, f"reporting {what} of {label} to the collector",
                _worth_reporting_again)


def _worth_reporting_again(exc: BaseException) -> bool:
    """A REPORT lost on the way is sent again, unless the collector will not have us."""
    if isinstance(exc, RejectedError):
        return exc.code == RejectCode.BUSY
    return isinstance(exc, TransportError) and not isinstance(exc, CollectorTrustError)


async def _deliver(client: CollectorClient, report: Report) -> None:
    channel = await client.channel()
    try:
        await channel.send(report)
        await channel.expect(Ack, timeout=ANSWER_TIMEOUT)
    finally:
        channel.close()


class AbortingChannel(Channel):
    """A channel that, closed in the middle of an upload, sends ABORT before it goes."""

    def __init__(
        self,
        writer: asyncssh.SSHWriter[bytes],
        reader: asyncssh.SSHReader[bytes],
        client: ServiceClient,
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


class ServiceClient(CollectorClient):
    """A collector client whose interrupted uploads end in ABORT, flushed before closing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abort_reason = "backup interrupted on the agent"
        self._channels: set[AbortingChannel] = set()

    async def channel(self) -> Channel:
        """As :meth:`CollectorClient.channel`, with ABORT on an interrupted upload.

        Raises:
            TransportError: the channel cannot be opened.
            RejectedError: the collector refused (busy, version).
        """
        writer, reader = await self.open_session()
        channel = AbortingChannel(writer, reader, self)
        self._channels.add(channel)
        await channel.handshake()
        return channel

    async def close(self) -> None:
        """Let closing channels deliver what they still hold (an ABORT), then disconnect."""
        channels, self._channels = self._channels, set()
        if channels:
            await asyncio.gather(*(c.wait_closed(CLOSE_GRACE) for c in channels))
        await super().close()
