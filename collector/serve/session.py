"""One SSH channel of the `backhaul` subsystem: runs the protocol for one request.

The agent's namespace is the authenticated agent name handed in by the server; nothing
in the stream can change it. Any error ends the request with a REJECT, discards the
temporary file, and yields one log line naming the peer and the cause.

Each request kind has its own handler (``upload``, ``report``, ``lookup``), which sees
this session only as the :class:`~collector.serve.context.RequestChannel` it implements.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import asyncssh

from collector.serve.context import SessionContext
from collector.serve.flow import ChannelClosed, Inbox, RateFloor
from collector.serve.lookup import serve_fetch, serve_list
from collector.serve.report import serve_report
from collector.serve.upload import BackupUpload
from common.errors import BackhaulError, RejectCode, RemoteProtocolError, StorageError
from common.events import Begin, Event, Fetch, ListRequest, Reject, Report, encode_payload
from common.frames import encode_frame
from common.protocol import SUBSYSTEM, Closed, Connection, Role, State
from common.text import escape_control

log = logging.getLogger(__name__)


class BackhaulSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """Deny-by-default session: only the `backhaul` subsystem is accepted."""

    def __init__(self, ctx: SessionContext, agent: str, peer: str, busy: str | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        # busy: when set, why every request on this channel is answered REJECT busy.
        # on_close: called once when the channel is gone (the server counts channels).
        self.ctx = ctx
        self._busy = busy
        self._on_close = on_close
        self.agent = agent
        self.peer = peer
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._inbox: Inbox | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._conn = Connection(Role.COLLECTOR)
        self._received = 0  # bytes that arrived on the channel, counted on arrival
        self._deadline = 0.0  # loop time by which the request must be complete
        self._start_timer: asyncio.TimerHandle | None = None
        self._floor: RateFloor | None = None

    # --- asyncssh callbacks -------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        self._inbox = Inbox(chan)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.ctx.handshake_timeout
        # A channel that never asks for the subsystem would otherwise stay open forever.
        self._start_timer = loop.call_at(self._deadline, self._not_started)

    def _not_started(self) -> None:
        log.warning("closing a channel of agent %s (%s): no subsystem requested in %.0f s",
                    self.agent, self.peer, self.ctx.handshake_timeout)
        if self._chan is not None:
            self._chan.close()

    def pty_requested(self, *args: object) -> bool:
        log.warning("refused PTY request from agent %s (%s)", self.agent, self.peer)
        return False

    def shell_requested(self) -> bool:
        log.warning("refused shell request from agent %s (%s)", self.agent, self.peer)
        return False

    def exec_requested(self, command: str) -> bool:
        log.warning("refused exec request from agent %s (%s): %s", self.agent, self.peer,
                    escape_control(command[:200]))
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == SUBSYSTEM:
            return True
        log.warning("refused subsystem %r from agent %s (%s)", escape_control(subsystem[:64]),
                    self.agent, self.peer)
        return False

    def session_started(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run())
        self.ctx.tasks.add(task)
        task.add_done_callback(self.ctx.tasks.discard)

    def data_received(self, data: bytes, datatype: object) -> None:
        assert self._inbox is not None
        self._received += len(data)
        self._inbox.put(bytes(data))

    def eof_received(self) -> bool:
        assert self._inbox is not None
        self._inbox.put(b"")
        return True  # keep our half open: a verdict may still have to be sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
        if self._inbox is not None:
            self._inbox.put(None)
        self._can_write.set()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- protocol: what the request handlers (upload, report, lookup) call --------------
    @property
    def peer_max_data(self) -> int:
        """The largest DATA payload the agent accepts."""
        return self._conn.peer_max_data

    async def next_event(self) -> Event:
        """The next event from the agent, within the idle timeout and the rate floor."""
        while True:
            event = self._conn.next_event()
            if event is not None:
                return event
            self._conn.receive_data(await self._receive())

    def queued_event(self) -> Event | None:
        """The next event that can be had without waiting, or None."""
        assert self._inbox is not None
        while (event := self._conn.next_event()) is None:
            data = self._inbox.get_nowait()
            if data is None:
                return None
            self._conn.receive_data(data)
        return event

    async def _receive(self) -> bytes:
        """The next bytes from the agent, within the idle timeout and the rate floor."""
        assert self._inbox is not None
        loop = asyncio.get_running_loop()
        idle_at = loop.time() + self.ctx.idle_timeout
        while True:
            wake = idle_at
            if self._floor is not None:
                if self._floor.check(self._received, loop.time(), self._inbox.held_back):
                    self._inbox.held_back = self._inbox.paused
                wake = min(wake, self._floor.next_check)
            try:
                async with asyncio.timeout_at(wake):
                    data = await self._inbox.get()
            except TimeoutError:
                if wake >= idle_at:
                    raise ChannelClosed(f"idle for {self.ctx.idle_timeout:.0f} s") from None
                continue
            if data is None:
                raise ChannelClosed("connection lost")
            return data

    def start_rate_floor(self) -> None:
        """From now on, hold the upload to the configured minimum rate."""
        if self.ctx.min_upload_rate > 0:
            self._floor = RateFloor(self.ctx.min_upload_rate, self.ctx.min_upload_rate_window,
                                     asyncio.get_running_loop().time(), self._received)

    async def send(self, event: Event) -> None:
        """Send one event, waiting (up to the idle timeout) while the agent reads nothing."""
        await self._write(self._conn.send(event))

    async def _write(self, data: bytes) -> None:
        assert self._chan is not None
        try:
            # An agent that stops reading must not hold this task (and an open file) forever.
            async with asyncio.timeout(self.ctx.idle_timeout):
                await self._can_write.wait()
        except TimeoutError:
            raise ChannelClosed(
                f"agent read nothing for {self.ctx.idle_timeout:.0f} s"
            ) from None
        try:
            self._chan.write(data)
        except ConnectionError:
            raise ChannelClosed("channel closed") from None

    async def _run(self) -> None:
        try:
            request = await self._open()
            if isinstance(request, Begin):
                await BackupUpload(self, request).run()
            elif isinstance(request, Report):
                await serve_report(self, request)
            elif isinstance(request, ListRequest):
                await serve_list(self, request)
            elif isinstance(request, Fetch):
                await serve_fetch(self, request)
        except RemoteProtocolError as exc:
            log.warning("protocol error from agent %s (%s): %s", self.agent, self.peer,
                        escape_control(str(exc), backslash=False))
            await self.reject(exc.reject_code, str(exc))
        except ChannelClosed as exc:
            log.info("channel from agent %s (%s) ended: %s", self.agent, self.peer,
                     escape_control(str(exc), backslash=False))
        except BackhaulError as exc:
            log.error("request from agent %s (%s) failed: %s", self.agent, self.peer,
                      escape_control(str(exc), backslash=False))
            await self.reject(exc.reject_code, str(exc))
        except Exception:  # a collector bug: log it in full, tell the agent little
            log.exception("internal error serving agent %s (%s)", self.agent, self.peer)
            await self.reject(RejectCode.INTERNAL, "internal error on the collector")
        finally:
            if self._chan is not None:
                self._chan.close()

    async def _open(self) -> Event | None:
        """HELLOs, then the request, all before the channel's deadline; None if busy.

        Raises:
            RemoteProtocolError: the deadline passed (a slow or silent agent).
        """
        try:
            async with asyncio.timeout_at(self._deadline):
                await self._handshake()
                if self._busy is not None:
                    await self.reject(RejectCode.BUSY, self._busy)
                    return None
                return await self.next_event()
        except TimeoutError:
            raise RemoteProtocolError(
                f"no complete HELLO and request within {self.ctx.handshake_timeout:.0f} s"
            ) from None

    async def reject(self, code: RejectCode, reason: str) -> None:
        """Tell the agent why its request failed, if the channel still lets us."""
        event = Reject(code.value, escape_control(reason, backslash=False)[:1000])
        try:
            if self._conn.state is State.START:
                # The first frame was already wrong. A conforming agent has sent its
                # HELLO by now and accepts a REJECT; say why rather than just hang up.
                await self._write(encode_frame(event.frame_type, encode_payload(event)))
            else:
                await self.send(event)
        except Exception:  # the channel may be gone or the state final; nothing to tell
            log.debug("could not send REJECT to %s", self.agent)

    async def _handshake(self) -> None:
        hello = await self.next_event()
        if isinstance(hello, Closed):
            raise ChannelClosed("closed before HELLO")
        assert hasattr(hello, "versions")  # the state machine only lets HELLO through
        version = self._conn.choose_version(hello)  # type: ignore[arg-type]
        await self.send(self._conn.hello(version))
        self.ctx.outcomes.agent_seen(self.agent)

    def database_allowed(self, database: str) -> bool:
        """True when this agent may send backups of the database."""
        allowed = self.ctx.allowed.get(self.agent)
        return allowed is None or database in allowed


def storage_free(root: Path) -> int:
    """Free bytes on the storage file system (for start-up checks)."""
    import shutil

    try:
        return shutil.disk_usage(root).free
    except OSError as exc:
        raise StorageError(f"cannot stat {root}: {exc.strerror}") from None
