"""The agent's SSH side: connect with a pinned host key, open one channel per request.

asyncssh errors are translated to TransportError here, at the one boundary, so the
runner deals only in Backhaul's own error families. A collector that cannot be reached
(or whose connection broke) raises CollectorUnreachableError, which is worth
retrying; a host key mismatch or a refused agent key raises CollectorTrustError, which
is not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from types import TracebackType
from typing import Any

import asyncssh

from agent.config import AgentConfig
from agent.link.retry import RetryPolicy, retry
from common.errors import (
    CollectorTrustError,
    CollectorUnreachableError,
    RejectCode,
    RejectedError,
    RemoteProtocolError,
    TransportError,
)
from common.events import Event, Hello, Reject
from common.protocol import SUBSYSTEM, Closed, Connection, Role

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
# The collector is at its connection cap or going away: a later attempt may get in.
_TRANSIENT_DISCONNECTS = frozenset({
    asyncssh.DISC_TOO_MANY_CONNECTIONS, asyncssh.DISC_CONNECTION_LOST,
    asyncssh.DISC_BY_APPLICATION,
})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may cure ``exc`` (the collector away or busy)."""
    if isinstance(exc, RejectedError):
        return exc.code == RejectCode.BUSY
    return isinstance(exc, CollectorUnreachableError)


def _known_hosts(config: AgentConfig) -> Any:
    endpoint = config.collector
    try:
        from common.identity import known_hosts_for

        return known_hosts_for(endpoint.host, endpoint.port, endpoint.host_key,
                               endpoint.ca_public_key)
    except ImportError:  # pragma: no cover - identity ships with the package
        assert endpoint.host_key is not None
        return ([asyncssh.read_public_key(str(endpoint.host_key))], [], [])


class Channel:
    """One conversation with the collector over one SSH channel."""

    def __init__(
        self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]
    ) -> None:
        self._writer = writer
        self._reader = reader
        self.protocol = Connection(Role.AGENT)
        self._watch: asyncio.Task[Event] | None = None

    async def send(self, event: Event) -> None:
        """Write an event, waiting while the SSH window is full (back-pressure).

        Raises:
            TransportError: the channel is gone.
        """
        try:
            self._writer.write(self.protocol.send(event))
            await self._writer.drain()
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            raise CollectorUnreachableError(f"connection to the collector lost: {exc}") from None

    async def receive(self, timeout: float | None = None) -> Event:
        """The next event from the collector (Closed at EOF).

        Raises:
            TransportError: the connection broke or timed out.
            RemoteProtocolError: the collector broke the protocol.
        """
        while True:
            event = self.protocol.next_event()
            if event is not None:
                return event
            try:
                async with asyncio.timeout(timeout):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                raise TransportError(f"no answer from the collector in {timeout:.0f} s") \
                    from None
            except (asyncssh.Error, OSError) as exc:
                raise CollectorUnreachableError(f"connection to the collector lost: {exc}") \
                    from None
            self.protocol.receive_data(data)

    def watch(self) -> None:
        """Start listening while we upload, so an early REJECT is seen at once."""
        self._watch = asyncio.get_running_loop().create_task(self.receive())

    def check_early_answer(self) -> None:
        """Raise if the collector already answered (an early REJECT) during the upload.

        Raises:
            RejectedError, TransportError, RemoteProtocolError: as ``expect``.
        """
        if self._watch is not None and self._watch.done():
            self._interpret(self._watch.result())

    async def early_answer(self, grace: float) -> None:
        """After a failed write: wait briefly for the REJECT that explains it."""
        if self._watch is None:
            return
        done, _ = await asyncio.wait({self._watch}, timeout=grace)
        if done and not self._watch.exception():
            self._interpret(self._watch.result())

    async def expect(self, *kinds: type[Event], timeout: float | None = None) -> Event:
        """Receive one event of the given kinds; REJECT and EOF become errors.

        Raises:
            RejectedError: the collector answered REJECT.
            TransportError: the channel closed first.
            RemoteProtocolError: anything else arrived.
        """
        if self._watch is not None:
            watch, self._watch = self._watch, None
            try:
                async with asyncio.timeout(timeout):
                    event = await watch
            except TimeoutError:
                raise TransportError(f"no answer from the collector in {timeout:.0f} s") \
                    from None
        else:
            event = await self.receive(timeout)
        return self._interpret(event, kinds)

    def _interpret(self, event: Event, kinds: tuple[type[Event], ...] = ()) -> Event:
        if isinstance(event, Reject):
            raise RejectedError(event.code, event.reason)
        if isinstance(event, Closed):
            raise TransportError("the collector closed the channel without an answer")
        if not isinstance(event, kinds):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} from the collector")
        return event

    async def handshake(self) -> None:
        await self.send(self.protocol.hello())
        await self.expect(Hello, timeout=60)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._writer.channel.close()

    @property
    def max_data(self) -> int:
        return self.protocol.peer_max_data


class CollectorClient:
    """An authenticated SSH connection to the collector (async context manager)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.retry_policy = RetryPolicy.for_endpoint(config.collector)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._reconnecting = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> CollectorClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def where(self) -> str:
        return f"{self.config.collector.host}:{self.config.collector.port}"

    async def connect(self) -> None:
        """Open the SSH connection, retrying an unreachable collector as the policy says.

        Raises:
            CollectorUnreachableError: still unreachable after every attempt.
            CollectorTrustError: host key mismatch, agent key refused.
            TransportError: the agent key is unreadable, or SSH itself failed.
        """
        self._closed = False
        policy = self.retry_policy
        started = time.monotonic()
        try:
            await retry(self._connect_once, policy, f"connecting to collector {self.where}",
                        is_transient)
        except CollectorUnreachableError as exc:
            if policy.retries == 0:
                raise
            raise CollectorUnreachableError(
                f"{exc} (gave up after {policy.attempts} attempts in "
                f"{time.monotonic() - started:.0f} s)"
            ) from None

    async def _connect_once(self) -> None:
        """One attempt at the SSH connection.

        Raises:
            As :meth:`connect`.
        """
        keys = self._client_keys()
        try:
            self._conn = await self._ssh_connect(keys)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise self._connect_error(exc) from None

    def _client_keys(self) -> list[Any]:
        """The agent's key, paired with its certificate when it has one.

        Raises:
            TransportError: the key or certificate cannot be read.
        """
        endpoint = self.config.collector
        try:
            key = asyncssh.read_private_key(str(endpoint.client_key))
            certificate = endpoint.client_certificate
            beside = endpoint.client_key.with_name(endpoint.client_key.name + "-cert.pub")
            if certificate is None and beside.exists():  # as ssh(1) and backhaul-certs do
                certificate = beside
            if certificate is not None:
                return [(key, asyncssh.read_certificate(str(certificate)))]
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise TransportError(f"cannot read the agent key {endpoint.client_key}: {exc}") \
                from None
        return [key]

    async def _ssh_connect(self, keys: list[Any]) -> asyncssh.SSHClientConnection:
        endpoint = self.config.collector
        return await asyncssh.connect(
            endpoint.host,
            endpoint.port,
            username=self.config.name,
            client_keys=keys,
            known_hosts=_known_hosts(self.config),
            agent_path=None,
            config=[],
            password=None,
            kbdint_auth=False,
            connect_timeout=endpoint.connect_timeout,
            keepalive_interval=30,
            keepalive_count_max=4,
            encoding=None,
            max_pktsize=256 * 1024,
            window=8 * 1024 * 1024,
            # AES-GCM runs on the CPU's AES instructions: about twice chacha20's rate
            # here, and the bulk of a backup's CPU besides the dump and zstd is SSH.
            encryption_algs=PREFERRED_CIPHERS,
        )

    def _connect_error(self, exc: BaseException) -> TransportError:
        """What a failed connection attempt means to the agent: the family says whether
        retrying may help (see the module docstring)."""
        where = self.where
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return CollectorTrustError(
                f"collector {where} presented a host key that does not match the pinned "
                f"one; refusing to connect ({exc.reason})"
            )
        if isinstance(exc, asyncssh.PermissionDenied):
            return CollectorTrustError(
                f"collector {where} refused this agent's key (is agent "
                f"{self.config.name!r} configured there with this public key?)"
            )
        if isinstance(exc, asyncssh.DisconnectError):
            error = TransportError
            if isinstance(exc, asyncssh.ConnectionLost) or exc.code in _TRANSIENT_DISCONNECTS:
                error = CollectorUnreachableError
            return error(f"SSH connection to {where} failed: {exc.reason}")
        if isinstance(exc, asyncssh.Error):
            return TransportError(f"SSH connection to {where} failed: {exc.reason}")
        errno = getattr(exc, "errno", None)
        # asyncio's own strerror ("Connect call failed (...)") says less than errno's.
        reason = (os.strerror(errno) if errno else None) or str(exc)
        if not reason:
            reason = f"no answer in {self.config.collector.connect_timeout:.0f} s"
        return CollectorUnreachableError(f"cannot reach collector {where}: {reason}")

    async def reconnect(self) -> None:
        """Drop the connection, if any, and connect again: one attempt, no retries.

        Raises:
            As :meth:`connect`.
        """
        if self._closed:
            raise TransportError("not connected: the client is closed")
        async with self._reconnecting:
            old, self._conn = self._conn, None
            if old is not None:
                old.close()
            await self._connect_once()

    async def channel(self) -> Channel:
        """Open a `backhaul` subsystem channel and exchange HELLOs.

        Raises:
            CollectorUnreachableError: the connection is gone and cannot be made again.
            TransportError: the channel cannot be opened.
            RejectedError: the collector refused (busy, version).
        """
        writer, reader = await self.open_session()
        channel = Channel(writer, reader)
        await channel.handshake()
        return channel

    async def open_session(
        self,
    ) -> tuple[asyncssh.SSHWriter[bytes], asyncssh.SSHReader[bytes]]:
        """Open a `backhaul` subsystem session; a broken connection is made again, once.

        Raises:
            CollectorUnreachableError: the connection is gone and cannot be made again.
            TransportError: the collector refused the channel, or the connection failed.
        """
        if self._closed:
            raise TransportError("not connected: the client is closed")
        async with self._reconnecting:  # concurrent requests share one new connection
            if self._conn is None or self._conn.is_closed():
                if self._conn is not None:
                    log.warning("connection to collector %s was lost; connecting again",
                                self.where)
                    self._conn = None
                await self._connect_once()
        assert self._conn is not None
        try:
            writer, reader, _ = await self._conn.open_session(subsystem=SUBSYSTEM,
                                                              encoding=None)
        except asyncssh.ChannelOpenError as exc:
            raise TransportError(f"collector refused the backhaul channel: {exc}") from None
        except (asyncssh.Error, OSError) as exc:
            raise CollectorUnreachableError(f"connection to the collector lost: {exc}") \
                from None
        return writer, reader

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            try:
                async with asyncio.timeout(10):
                    await self._conn.wait_closed()
            except (TimeoutError, asyncssh.Error, OSError):
                log.debug("connection close did not complete cleanly")
            self._conn = None
