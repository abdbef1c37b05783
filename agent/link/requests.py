"""What the agent asks of the collector besides an upload: LIST, FETCH and REPORT.

A FETCH is checked while it streams against the manifest that FETCH_META carries (the
size and SHA-256 recorded when the backup was stored) and against END: more bytes than
the manifest's size stop it at once, and a wrong count or digest at the end is an
:class:`~common.errors.IntegrityError`. A REPORT lost on the way is sent again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.link.connection import CollectorClient
from agent.link.retry import retry
from common.errors import (
    CollectorTrustError,
    IntegrityError,
    RejectCode,
    RejectedError,
    RemoteProtocolError,
    TransportError,
)
from common.events import SHA256_RE, Ack, Data, End, FetchMeta, Listing, ListRequest, Report
from common.events import Fetch as FetchRequest
from common.text import escape_control

log = logging.getLogger(__name__)
ANSWER_TIMEOUT = 120.0
FETCH_IDLE_TIMEOUT = 300.0


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
