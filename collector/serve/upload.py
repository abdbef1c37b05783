"""An upload: BEGIN checked, every DATA frame proven by the ingest integrity check and
written, END's byte count and SHA-256 matched, then the backup stored with its manifest.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from collector.report.outcomes import Outcome
from collector.serve.context import RequestChannel
from collector.serve.flow import ChannelClosed
from collector.store.files import StoredBackup, Upload
from common.errors import BackhaulError, RejectCode, RemoteProtocolError
from common.events import Abort, Begin, Data, End, Event, Stored
from common.integrity import IntegrityChecker
from common.naming import check_database_name, extension_for
from common.protocol import Closed
from common.text import escape_control

# The session's logger: the log lines read as they did when this lived in session.py.
log = logging.getLogger("collector.serve.session")
BATCH_BYTES = 1024 * 1024  # received DATA verified in one step, at most
ENGINES = {
    "mysql": ("sql",),
    "mongodb": ("archive",),
    "postgresql": ("pgdump", "pgsql"),  # each database's archive; the globals' SQL
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


class BackupUpload:
    """The BEGIN → DATA… → END|ABORT part of one session."""

    def __init__(self, session: RequestChannel, begin: Begin) -> None:
        self.session = session
        self.ctx = session.ctx
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
                if not isinstance(exc, ChannelClosed | Aborted):
                    await self.session.reject(exc.reject_code, str(exc))
            else:
                log.exception("internal error receiving %s", self._label())
                await self.session.reject(RejectCode.INTERNAL, "internal error on the collector")
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
        await self.session.send(Stored(stored.name, stored.manifest["sha256"],
                                        int(stored.manifest["size"])))

    async def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            reason, message = "shutdown", "collector shutting down"
        elif isinstance(exc, ChannelClosed):
            reason, message = "transport", f"connection cut mid-stream: {exc}"
        elif isinstance(exc, Aborted) and exc.code:
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
        if not self.session.database_allowed(begin.database):
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
            event = pending or await self.session.next_event()
            pending = None
            if isinstance(event, Data):
                # Every DATA already received is verified and written in one step: one
                # step per frame cost the collector a fifth of its CPU in thread wake-ups.
                batch, size = [event.payload], len(event.payload)
                while size < BATCH_BYTES and isinstance(
                    pending := self.session.queued_event(), Data
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
                raise Aborted(escape_control(event.reason, backslash=False), event.code)
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


class Aborted(BackhaulError):
    """The agent sent ABORT."""

    reject_code = RejectCode.ABORTED

    def __init__(self, reason: str, code: str = "") -> None:
        super().__init__(f"agent aborted: {reason}")
        self.code = code
