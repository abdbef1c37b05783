"""One SSH channel of the `backhaul` subsystem: runs the protocol for one request.

The agent's namespace is the authenticated agent name handed in by the server; nothing
in the stream can change it. Any error ends the request with a REJECT, discards the
temporary file, and yields one log line naming the peer and the cause.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import aiofiles
import asyncssh

from collector.report.outcomes import FanOut, Outcome
from collector.serve.flow import ChannelClosed, Inbox, RateFloor
from collector.store.files import Store, StoredBackup, Upload
from common.errors import (
    BackhaulError,
    RejectCode,
    RemoteProtocolError,
    StorageError,
)
from common.events import (
    Abort,
    Ack,
    Begin,
    Data,
    End,
    Event,
    Fetch,
    FetchMeta,
    Listing,
    ListRequest,
    Reject,
    Report,
    Stored,
    encode_payload,
)
from common.frames import MAX_CONTROL_PAYLOAD, encode_frame
from common.integrity import DEFAULT_MAX_RATIO, IntegrityChecker
from common.naming import check_database_name, extension_for
from common.protocol import SUBSYSTEM, Closed, Connection, Role, State
from common.text import escape_control

log = logging.getLogger(__name__)
BATCH_BYTES = 1024 * 1024  # received DATA verified in one step, at most
FETCH_CHUNK = 256 * 1024
ENGINES = {
    "mysql": ("sql",),
    "mongodb": ("archive",),
    "postgresql": ("pgdump", "pgsql"),  # each database's archive; the globals' SQL
}


@dataclass
class SessionContext:
    """What every session of the collector shares."""

    store: Store
    timezone: tzinfo
    outcomes: FanOut
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0  # channel open -> HELLO -> request, in all
    min_upload_rate: int = 1024  # bytes/s each window of an upload must average; 0: off
    min_upload_rate_window: float = 60.0
    clock_skew: float = 600.0
    max_backup_bytes: int | None = None
    max_expansion: int = DEFAULT_MAX_RATIO
    allowed: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    agent_max_bytes: dict[str, int | None] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    clock: Any = time.time
    uploads: int = 0  # BEGIN…END in progress, over all sessions


class BackhaulSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """Deny-by-default session: only the `backhaul` subsystem is accepted."""

    def __init__(self, ctx: SessionContext, agent: str, peer: str, busy: str | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        # busy: when set, why every request on this channel is answered REJECT busy.
        # on_close: called once when the channel is gone (the server counts channels).
        self._ctx = ctx
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
        self._deadline = loop.time() + self._ctx.handshake_timeout
        # A channel that never asks for the subsystem would otherwise stay open forever.
        self._start_timer = loop.call_at(self._deadline, self._not_started)

    def _not_started(self) -> None:
        log.warning("closing a channel of agent %s (%s): no subsystem requested in %.0f s",
                    self.agent, self.peer, self._ctx.handshake_timeout)
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
        self._ctx.tasks.add(task)
        task.add_done_callback(self._ctx.tasks.discard)

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

    # --- protocol ---------------------------------------------------------------
    async def _next_event(self) -> Event:
        while True:
            event = self._conn.next_event()
            if event is not None:
                return event
            self._conn.receive_data(await self._receive())

    def _queued_event(self) -> Event | None:
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
        idle_at = loop.time() + self._ctx.idle_timeout
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
                    raise ChannelClosed(f"idle for {self._ctx.idle_timeout:.0f} s") from None
                continue
            if data is None:
                raise ChannelClosed("connection lost")
            return data

    def start_rate_floor(self) -> None:
        """From now on, hold the upload to the configured minimum rate."""
        if self._ctx.min_upload_rate > 0:
            self._floor = RateFloor(self._ctx.min_upload_rate, self._ctx.min_upload_rate_window,
                                     asyncio.get_running_loop().time(), self._received)

    async def _send(self, event: Event) -> None:
        await self._write(self._conn.send(event))

    async def _write(self, data: bytes) -> None:
        assert self._chan is not None
        try:
            # An agent that stops reading must not hold this task (and an open file) forever.
            async with asyncio.timeout(self._ctx.idle_timeout):
                await self._can_write.wait()
        except TimeoutError:
            raise ChannelClosed(
                f"agent read nothing for {self._ctx.idle_timeout:.0f} s"
            ) from None
        try:
            self._chan.write(data)
        except ConnectionError:
            raise ChannelClosed("channel closed") from None

    async def _run(self) -> None:
        try:
            request = await self._open()
            if isinstance(request, Begin):
                await _Upload(self, request).run()
            elif isinstance(request, Report):
                await self._report(request)
            elif isinstance(request, ListRequest):
                await self._list(request)
            elif isinstance(request, Fetch):
                await self._fetch(request)
        except RemoteProtocolError as exc:
            log.warning("protocol error from agent %s (%s): %s", self.agent, self.peer,
                        escape_control(str(exc), backslash=False))
            await self._reject(exc.reject_code, str(exc))
        except ChannelClosed as exc:
            log.info("channel from agent %s (%s) ended: %s", self.agent, self.peer,
                     escape_control(str(exc), backslash=False))
        except BackhaulError as exc:
            log.error("request from agent %s (%s) failed: %s", self.agent, self.peer,
                      escape_control(str(exc), backslash=False))
            await self._reject(exc.reject_code, str(exc))
        except Exception:  # a collector bug: log it in full, tell the agent little
            log.exception("internal error serving agent %s (%s)", self.agent, self.peer)
            await self._reject(RejectCode.INTERNAL, "internal error on the collector")
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
                    await self._reject(RejectCode.BUSY, self._busy)
                    return None
                return await self._next_event()
        except TimeoutError:
            raise RemoteProtocolError(
                f"no complete HELLO and request within {self._ctx.handshake_timeout:.0f} s"
            ) from None

    async def _reject(self, code: RejectCode, reason: str) -> None:
        event = Reject(code.value, escape_control(reason, backslash=False)[:1000])
        try:
            if self._conn.state is State.START:
                # The first frame was already wrong. A conforming agent has sent its
                # HELLO by now and accepts a REJECT; say why rather than just hang up.
                await self._write(encode_frame(event.frame_type, encode_payload(event)))
            else:
                await self._send(event)
        except Exception:  # the channel may be gone or the state final; nothing to tell
            log.debug("could not send REJECT to %s", self.agent)

    async def _handshake(self) -> None:
        hello = await self._next_event()
        if isinstance(hello, Closed):
            raise ChannelClosed("closed before HELLO")
        assert hasattr(hello, "versions")  # the state machine only lets HELLO through
        version = self._conn.choose_version(hello)  # type: ignore[arg-type]
        await self._send(self._conn.hello(version))
        self._ctx.outcomes.agent_seen(self.agent)

    async def _report(self, report: Report) -> None:
        database = report.database
        if database is not None and not (_storable(database) and self._database_allowed(database)):
            database = None
        # The agent composed it, its own names already escaped: do not double those escapes.
        message = escape_control(report.message, backslash=False)
        if report.kind != "failure":
            await self._drill_report(report, database, message)
            return
        log.error("agent %s reports failure (%s) for %s: %s", self.agent,
                  escape_control(report.reason), escape_control(database or "-"), message)
        self._ctx.outcomes.finished(Outcome(
            agent=self.agent, database=database, backup_id=secrets.token_hex(6),
            result="failure", reason=escape_control(report.reason), message=message,
            is_report=True,
        ))
        await self._send(Ack())

    async def _drill_report(self, report: Report, database: str | None, message: str) -> None:
        ok = report.kind == "drill_ok"
        if database is None:
            raise RemoteProtocolError("a drill report names a database", RejectCode.NOT_ALLOWED)
        level = logging.INFO if ok else logging.ERROR
        log.log(level, "agent %s restore drill of %s %s: %s", self.agent,
                escape_control(database), "passed" if ok else "FAILED", message)
        self._ctx.outcomes.finished(Outcome(
            agent=self.agent, database=database, backup_id=secrets.token_hex(6),
            result="success" if ok else "failure",
            reason=None if ok else escape_control(report.reason) or "drill",
            message=message, is_drill=True,
        ))
        await self._send(Ack())

    async def _list(self, request: ListRequest) -> None:
        if request.database is not None:
            check_database_name(request.database)
        backups = await asyncio.to_thread(self._ctx.store.backups, self.agent, request.database)
        summaries: list[dict[str, Any]] = []
        budget = MAX_CONTROL_PAYLOAD - 1024
        for backup in reversed(backups):  # newest first, as many as fit
            summary = _summary(backup)
            budget -= len(json.dumps(summary, ensure_ascii=False).encode()) + 8
            if budget < 0:
                break
            summaries.append(summary)
        await self._send(Listing(tuple(reversed(summaries))))

    async def _fetch(self, request: Fetch) -> None:
        check_database_name(request.database)
        folder = self._ctx.store.database_folder(self.agent, request.database)
        match = [b for b in await asyncio.to_thread(self._ctx.store.backups, self.agent,
                                                    request.database)
                 if b.name == request.name]
        if not match:
            raise RemoteProtocolError(
                f"no backup {request.name!r} of {request.database!r}", RejectCode.NOT_FOUND
            )
        backup = match[0]
        await self._send(FetchMeta(backup.name, backup.manifest))
        sent = 0
        async with aiofiles.open(folder / backup.name, "rb") as handle:
            while chunk := await handle.read(min(FETCH_CHUNK, self._conn.peer_max_data)):
                await self._send(Data(chunk))
                sent += len(chunk)
        await self._send(End(sent, str(backup.manifest.get("sha256", "")), {}))
        log.info("agent %s fetched %s (%d bytes)", self.agent, backup.name, sent)

    def _database_allowed(self, database: str) -> bool:
        allowed = self._ctx.allowed.get(self.agent)
        return allowed is None or database in allowed


def _storable(database: str) -> bool:
    try:
        check_database_name(database)
    except RemoteProtocolError:
        return False
    return True


def _summary(backup: StoredBackup) -> dict[str, Any]:
    manifest = backup.manifest
    return {
        "name": backup.name,
        "database": manifest.get("database"),
        "size": manifest.get("size"),
        "sha256": manifest.get("sha256"),
        "started_at": manifest.get("started_at"),
        "engine": manifest.get("engine"),
        "verified": bool(manifest.get("verified")),
    }


def parse_started_at(text: str, now: float, skew: float) -> datetime:
    """The agent's start time, if it is a real UTC time close to the collector's clock.

    Raises:
        RemoteProtocolError: reject code ``bad_time``.
    """
    try:
        started = datetime.fromisoformat(text)
    except ValueError:
        raise RemoteProtocolError("started_at is not an ISO 8601 time", RejectCode.BAD_TIME) \
            from None
    if started.tzinfo is None or started.utcoffset() != timedelta(0):
        raise RemoteProtocolError("started_at must be in UTC", RejectCode.BAD_TIME)
    offset = started.timestamp() - now
    if abs(offset) > skew:
        raise RemoteProtocolError(
            f"started_at is {offset:+.0f} s from the collector's clock "
            f"(more than {skew:.0f} s allowed)",
            RejectCode.BAD_TIME,
        )
    return started.astimezone(UTC)


class _Upload:
    """The BEGIN → DATA… → END|ABORT part of one session."""

    def __init__(self, session: BackhaulSession, begin: Begin) -> None:
        self.session = session
        self.ctx = session._ctx
        self.begin = begin
        self.backup_id = secrets.token_hex(6)
        self.started_monotonic = time.monotonic()
        self.upload: Upload | None = None
        self.verifier: IntegrityChecker | None = None

    def _label(self) -> str:
        return f"{self.session.agent}/{escape_control(self.begin.database)} [{self.backup_id}]"

    async def run(self) -> None:
        agent, database = self.session.agent, self.begin.database
        self.ctx.outcomes.started(agent, database, self.backup_id)
        self.ctx.uploads += 1
        try:
            stored = await self._receive()
        except asyncio.CancelledError as exc:
            await self._fail(exc)
            raise
        except Exception as exc:
            if self.upload is not None:  # gone before the agent hears why
                await asyncio.to_thread(self.upload.discard)
            await self._fail(exc)
            if isinstance(exc, BackhaulError):
                if not isinstance(exc, ChannelClosed | _Aborted):
                    await self.session._reject(exc.reject_code, str(exc))
            else:
                log.exception("internal error receiving %s", self._label())
                await self.session._reject(RejectCode.INTERNAL, "internal error on the collector")
            return
        finally:
            self.ctx.uploads -= 1
            if self.upload is not None:
                await asyncio.to_thread(self.upload.discard)
        log.info("stored %s as %s (%d bytes, sha256 %s)", self._label(), stored.name,
                 stored.manifest["size"], stored.manifest["sha256"])
        self.ctx.outcomes.finished(Outcome(
            agent=agent, database=database, backup_id=self.backup_id, result="success",
            reason=None, message=f"stored as {stored.name}",
            size_bytes=int(stored.manifest["size"]),
            uncompressed_bytes=int(stored.manifest["verification"]["uncompressed_bytes"]),
            duration_s=time.monotonic() - self.started_monotonic, name=stored.name,
        ))
        await self.session._send(Stored(stored.name, stored.manifest["sha256"],
                                        int(stored.manifest["size"])))

    async def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            reason, message = "shutdown", "collector shutting down"
        elif isinstance(exc, ChannelClosed):
            reason, message = "transport", f"connection cut mid-stream: {exc}"
        elif isinstance(exc, _Aborted) and exc.code:
            reason, message = exc.code, str(exc)
        elif isinstance(exc, BackhaulError):
            reason, message = exc.reject_code.value, str(exc)
        else:
            reason, message = RejectCode.INTERNAL.value, "internal error"
        log.error("backup %s from %s failed (%s): %s", self._label(), self.session.peer, reason,
                  escape_control(message, backslash=False))
        self.ctx.outcomes.finished(Outcome(
            agent=self.session.agent, database=self.begin.database, backup_id=self.backup_id,
            result="failure", reason=reason, message=escape_control(message, backslash=False),
            size_bytes=self.upload.bytes_written if self.upload else 0,
            duration_s=time.monotonic() - self.started_monotonic,
        ))

    def _validate(self) -> tuple[str, str, datetime]:
        begin = self.begin
        check_database_name(begin.database)
        if not self.session._database_allowed(begin.database):
            raise RemoteProtocolError(
                f"agent {self.session.agent} may not send database {begin.database!r}",
                RejectCode.NOT_ALLOWED,
            )
        formats = ENGINES.get(begin.engine)
        if formats is None or begin.format not in formats:
            raise RemoteProtocolError(
                f"unsupported engine/format {begin.engine!r}/{begin.format!r}"
            )
        ext = extension_for(begin.format, begin.compression)
        started = parse_started_at(begin.started_at, self.ctx.clock(), self.ctx.clock_skew)
        return begin.format, ext, started

    def _cap(self) -> int | None:
        caps = [c for c in (self.ctx.max_backup_bytes,
                            self.ctx.agent_max_bytes.get(self.session.agent)) if c]
        return min(caps) if caps else None

    async def _receive(self) -> StoredBackup:
        fmt, ext, started = self._validate()
        cap = self._cap()
        self.upload = await asyncio.to_thread(
            self.ctx.store.begin, self.session.agent, self.begin.database, ext
        )
        self.verifier = IntegrityChecker(fmt, self.begin.compression, self.ctx.max_expansion)
        log.info("receiving %s from %s (%s, started %s)", self._label(), self.session.peer, ext,
                 escape_control(self.begin.started_at))
        self.session.start_rate_floor()
        pending: Event | None = None
        while True:
            event = pending or await self.session._next_event()
            pending = None
            if isinstance(event, Data):
                # Every DATA already received is verified and written in one step: one
                # step per frame cost the collector a fifth of its CPU in thread wake-ups.
                batch, size = [event.payload], len(event.payload)
                while size < BATCH_BYTES and isinstance(
                    pending := self.session._queued_event(), Data
                ):
                    batch.append(pending.payload)
                    size += len(pending.payload)
                    pending = None
                if cap is not None and self.upload.bytes_written + size > cap:
                    raise RemoteProtocolError(
                        f"backup exceeds the maximum size of {cap} bytes", RejectCode.TOO_LARGE
                    )
                if self.ctx.uploads == 1:
                    # Alone, an upload is verified in the event loop's thread: a hand-over
                    # per batch moved the bytes to another core and cost a tenth of the
                    # collector's CPU. With several at once, worker threads let more
                    # than one core verify (hashing and zstd release the GIL).
                    self._take(batch)
                else:
                    await asyncio.to_thread(self._take, batch)
            elif isinstance(event, End):
                return await self._finish(event, started)
            elif isinstance(event, Abort):
                raise _Aborted(escape_control(event.reason, backslash=False), event.code)
            elif isinstance(event, Closed):
                raise ChannelClosed("agent closed the channel before END")

    def _take(self, payloads: list[bytes]) -> None:
        assert self.upload is not None and self.verifier is not None
        for payload in payloads:
            self.verifier.feed(payload)
            self.upload.write(payload)

    async def _finish(self, end: End, started: datetime) -> StoredBackup:
        assert self.upload is not None and self.verifier is not None
        facts = self.verifier.finish(end.byte_count, end.sha256)
        now = datetime.now(UTC)
        manifest: dict[str, Any] = {
            "manifest_version": 1,
            "agent": self.session.agent,
            "database": self.begin.database,
            "source": self.begin.source,
            "engine": self.begin.engine,
            "format": self.begin.format,
            "compression": self.begin.compression,
            "size": end.byte_count,
            "sha256": end.sha256,
            "started_at": started.isoformat(),
            "received_at": datetime.fromtimestamp(
                now.timestamp() - (time.monotonic() - self.started_monotonic), UTC
            ).isoformat(),
            "stored_at": now.isoformat(),
            "timezone": str(self.ctx.timezone),
            "size_estimate": self.begin.size_estimate,
            "verified": True,
            "verification": {"sha256": True, "byte_count": True, "stream_complete": True,
                             **facts},
            "dump": end.metadata,
            "backup_id": self.backup_id,
        }
        day = started.astimezone(self.ctx.timezone).date()
        upload = self.upload
        return await asyncio.to_thread(upload.commit, day, manifest)


class _Aborted(BackhaulError):
    """The agent sent ABORT."""

    reject_code = RejectCode.ABORTED

    def __init__(self, reason: str, code: str = "") -> None:
        super().__init__(f"agent aborted: {reason}")
        self.code = code


def storage_free(root: Path) -> int:
    """Free bytes on the storage file system (for start-up checks)."""
    import shutil

    try:
        return shutil.disk_usage(root).free
    except OSError as exc:
        raise StorageError(f"cannot stat {root}: {exc.strerror}") from None
