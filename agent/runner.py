"""One backup run: every requested database, one after the other, each on its own channel.

A database's failure stops that backup (ABORT, or a REPORT when no dump started) and
the run goes on with the next database. The run's result lists each database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig, SourceConfig
from agent.engines.adapters import Adapter, adapter_for
from agent.link.pending import LinkDown, PendingClient, settle
from agent.stream.compress_thread import PipeDump, pump
from agent.stream.early_buffer import ChannelLate, EarlyBuffer
from agent.stream.stages import DumpStalled, Progress, StreamResult, run_pipeline
from common.compression import make_compressor
from common.errors import (
    BackhaulError,
    DumpError,
    ExitCode,
    TransportError,
)
from common.events import Abort, Begin, Data, End, Stored
from common.text import escape_control

if TYPE_CHECKING:  # the SSH stack loads in the background (agent.link.pending)
    from agent.link.connection import Channel, CollectorClient

log = logging.getLogger(__name__)
VERDICT_TIMEOUT = 3600.0  # the collector verifies at END; a large backup takes a while
# One zstd worker thread: compression then overlaps the event loop's reading and
# sending instead of taking turns with it (about a fifth faster end to end on 2 cores).
ZSTD_WORKERS = 1


@dataclass
class BackupResult:
    """How one database's backup ended."""

    source: str
    database: str | None
    ok: bool
    name: str | None = None
    size: int = 0
    sha256: str | None = None
    error: str | None = None
    exit_code: ExitCode = ExitCode.OK
    duration_s: float = 0.0
    cause: BaseException | None = field(default=None, repr=False, compare=False)  # retry or not

    def line(self) -> str:
        label = f"{self.source}/{escape_control(self.database or '*')}"
        if self.ok:
            return (f"ok      {label} -> {self.name} ({self.size} bytes, "
                    f"sha256 {self.sha256}, {self.duration_s:.1f} s)")
        return f"FAILED  {label}: {escape_control(self.error or 'unknown error', backslash=False)}"


def run_exit_code(results: list[BackupResult]) -> ExitCode:
    """0 when all succeeded; the common family's code when all failures share one; else 1."""
    codes = {r.exit_code for r in results if not r.ok}
    if not results:
        return ExitCode.FAILED
    if not codes:
        return ExitCode.OK
    return codes.pop() if len(codes) == 1 else ExitCode.FAILED


def _now() -> str:
    """The time now, as BEGIN and REPORT carry it (UTC, whole seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")



# Runs one database's backup (the callable given) inside what the caller needs around it:
# the database's lock and the record of the run (agent.guard).
Guard = Callable[[SourceConfig, str, Callable[[], Awaitable[BackupResult]]],
                 Awaitable[BackupResult]]


async def _unguarded(source: SourceConfig, database: str,
                     backup: Callable[[], Awaitable[BackupResult]]) -> BackupResult:
    return await backup()


class BackupRunner:
    """Backs up the selected databases of the configured sources."""

    def __init__(self, config: AgentConfig, client: CollectorClient | PendingClient,
                 progress_factory: Any = None, guard: Guard = _unguarded) -> None:
        self.config = config
        self.client = client
        self.progress_factory = progress_factory
        self.guard = guard

    async def run(self, source_name: str | None = None,
                  database: str | None = None) -> list[BackupResult]:
        """Back up the selected databases; each one's result, in order.

        Raises:
            BackhaulError: a pending connection to the collector could not be made
                (the run stops there, whatever databases remain).
        """
        results: list[BackupResult] = []
        try:
            for source in self.config.sources:
                if source_name is not None and source.name != source_name:
                    continue
                results.extend(await self.run_source(source, database))
            await self._connected()  # a run with nothing to send still needs the collector
        except LinkDown as down:
            raise down.error from None
        return results

    async def _connected(self) -> CollectorClient:
        """The connected client.

        Raises:
            LinkDown: the pending connection could not be made.
        """
        if isinstance(self.client, PendingClient):
            return await self.client.get()
        return self.client

    async def run_source(self, source: SourceConfig, only: str | None) -> list[BackupResult]:
        try:
            adapter = adapter_for(source)
            if only is not None:
                databases = [only]
            elif source.databases == "all":
                databases = await adapter.discover()
            else:
                databases = list(source.databases)
        except BackhaulError as exc:
            log.error("source %s: cannot list databases: %s", source.name, exc)
            await self._report(source, None, exc)
            return [self._failed(source, None, exc, 0.0)]
        if not databases:
            log.warning("source %s: no databases to back up", source.name)
        return [
            await self.guard(source, db, functools.partial(self.backup_one, source, adapter, db))
            for db in databases
        ]

    def _failed(self, source: SourceConfig, database: str | None, exc: BaseException,
                started: float) -> BackupResult:
        code = exc.exit_code if isinstance(exc, BackhaulError) else ExitCode.FAILED
        return BackupResult(source.name, database, False, error=str(exc), exit_code=code,
                            duration_s=time.monotonic() - started if started else 0.0,
                            cause=exc)

    async def backup_one(self, source: SourceConfig, adapter: Adapter,
                         database: str) -> BackupResult:
        started = time.monotonic()
        label = f"{source.name}/{escape_control(database)}"
        try:
            facts = await adapter.preflight(database)
        except BackhaulError as exc:
            log.error("backup of %s failed before the dump started: %s", label, exc)
            await self._report(source, database, exc)
            return self._failed(source, database, exc, started)
        for warning in facts.warnings:
            log.warning("%s: %s", label, warning)
        try:
            stored = await self._stream(source, adapter, database, facts.size_estimate,
                                        facts.metadata)
        except BackhaulError as exc:
            log.error("backup of %s failed: %s", label, exc)
            return self._failed(source, database, exc, started)
        result = BackupResult(source.name, database, True, name=stored.name, size=stored.size,
                              sha256=stored.sha256, duration_s=time.monotonic() - started)
        log.info("backup of %s stored as %s (%d bytes, sha256 %s) in %.1f s", label,
                 stored.name, stored.size, stored.sha256, result.duration_s)
        return result

    async def _stream(self, source: SourceConfig, adapter: Adapter, database: str,
                      size_estimate: int | None, metadata: dict[str, Any]) -> Stored:
        """Dump ``database`` into a channel that opens meanwhile; the collector's STORED.

        Raises:
            LinkDown: the run's pending connection could not be made.
            DumpError: the dump failed (the collector got ABORT, if the channel opened).
            TransportError, RejectedError, RemoteProtocolError: the upload failed.
        """
        if isinstance(self.client, PendingClient) and self.client.failed:
            await self.client.get()  # raises LinkDown: no dump for a run that is over
        begin = _BeginFacts(source, adapter, database, size_estimate)
        opening = asyncio.get_running_loop().create_task(self._open(begin.event))
        try:
            progress = (self.progress_factory(database, size_estimate)
                        if self.progress_factory else Progress())
            channel, result, dump_meta = await self._upload(begin, opening, progress)
            return await _conclude(channel, result, {**metadata, **dump_meta})
        finally:
            if (opened := await settle(opening)) is not None:
                opened.close()

    async def _upload(self, begin: _BeginFacts, opening: asyncio.Task[Channel],
                      progress: Progress) -> tuple[Channel, StreamResult, dict[str, Any]]:
        """The dump, sent on the channel as it opens: the channel once all is on it, the
        stream's totals and the dump's facts. A failed dump ends in ABORT; a channel cut
        under the upload waits briefly for the REJECT that says why."""
        early: EarlyBuffer[Channel] = EarlyBuffer(opening, _send_data)
        try:
            result, dump_meta = await _dump_until_done(early, begin, opening, progress)
            return await early.channel(), result, dump_meta
        except DumpError as exc:
            if (opened := await early.opened()) is not None:
                await self._abort(opened, str(exc),
                                  "stall" if isinstance(exc, DumpStalled) else "dump")
            raise
        except TransportError:
            if (opened := await early.opened()) is not None:
                await opened.early_answer(grace=5)  # a REJECT explains a cut channel
            raise

    async def _open(self, begin: Callable[[], Begin]) -> Channel:
        """A channel to the collector on which ``begin()`` is sent and answers are watched.

        Raises:
            LinkDown: the run's pending connection could not be made.
            TransportError, RejectedError: the channel could not be opened.
        """
        client = await self._connected()
        channel = await client.channel()
        try:
            await channel.send(begin())
        except BaseException:
            channel.close()
            raise
        channel.watch()
        return channel

    async def _abort(self, channel: Channel, reason: str, code: str) -> None:
        try:
            await channel.send(Abort(reason[:1000], code))
        except BackhaulError:
            log.debug("could not send ABORT; the channel is already gone")

    async def _report(self, source: SourceConfig, database: str | None,
                      exc: BackhaulError) -> None:
        """Tell the collector about a failure before any dump began.

        A report lost on the way (collector unreachable, connection broken, busy) is
        sent again on a new connection, with backoff (``[collector] retries``,
        ``retry_backoff``). If the collector stays away the failure is only in the local
        log, and the collector's missing-backup alert covers the silence.
        """
        label = f"{source.name}/{escape_control(database or '*')}"
        client = await self._connected()
        # Here, not at the top: the SSH stack is loaded by now (agent.link.pending).
        from agent.link.requests import send_report

        try:
            await send_report(client, kind="failure", reason=exc.reason, message=str(exc),
                              database=database, source=source.name)
        except BackhaulError as err:
            log.error("could not report the failure of %s to the collector: %s", label, err)
        else:
            log.info("reported the failure of %s to the collector", label)


@dataclass
class _BeginFacts:
    """What BEGIN says of one backup.

    ``started_at`` is when the dump whose bytes follow BEGIN started: at first now, as
    the dump starts while the channel opens (agent.stream.early_buffer); None once a dump
    was stopped to start again when the channel is open, so that BEGIN gives the time it
    goes out.
    """

    source: SourceConfig
    adapter: Adapter
    database: str
    size_estimate: int | None
    started_at: str | None = field(default_factory=_now)

    def event(self) -> Begin:
        return Begin(
            database=self.database, engine=self.adapter.engine,
            format=self.adapter.format_for(self.database),
            compression=self.source.compression, started_at=self.started_at or _now(),
            size_estimate=self.size_estimate, source=self.source.name,
        )


async def _dump_until_done(early: EarlyBuffer[Channel], begin: _BeginFacts,
                           opening: asyncio.Task[Channel],
                           progress: Progress) -> tuple[StreamResult, dict[str, Any]]:
    """Run the dump into ``early``; one stopped because the channel is late runs again
    once the channel is open (its bytes dropped)."""
    while True:
        try:
            return await _dump_into(early.send, begin.source, begin.adapter, begin.database,
                                    progress)
        except ChannelLate as late:
            # Leaving the dump's context stopped the tool: no snapshot or table lock is
            # held while the connection is retried.
            log.warning("%s/%s: %s; stopped the dump, to start it again once the collector "
                        "answers", begin.source.name, escape_control(begin.database), late)
            begin.started_at = None  # the backup's day is that of the next dump
            await asyncio.wait({opening})
            opening.result()  # the connection's error, if it never came
            early.drop()
            progress.raw_bytes = progress.sent_bytes = 0


async def _conclude(channel: Channel, result: StreamResult, meta: dict[str, Any]) -> Stored:
    """END with the stream's totals; the collector's STORED, checked against them."""
    end_meta = {**meta, "uncompressed_bytes": result.raw_bytes,
                "agent_host_time": datetime.now(UTC).isoformat()}
    await channel.send(End(result.byte_count, result.sha256, end_meta))
    stored = await channel.expect(Stored, timeout=VERDICT_TIMEOUT)
    assert isinstance(stored, Stored)
    if stored.sha256 != result.sha256 or stored.size != result.byte_count:
        raise TransportError("collector's STORED does not match what was sent")
    return stored


async def _dump_into(send: Callable[[bytes], Awaitable[None]], source: SourceConfig,
                     adapter: Adapter, database: str,
                     progress: Progress) -> tuple[StreamResult, dict[str, Any]]:
    """Run the dump of ``database``, its output compressed and hashed into ``send``;
    returns the stream's totals and the adapter's facts about the dump. Leaving early
    (an error, a cancellation) stops the dump tool."""
    async with adapter.dump(database) as dump:
        compressor = make_compressor(source.compression, source.compression_level,
                                     threads=ZSTD_WORKERS)
        stall = source.stall_timeout
        if isinstance(dump, PipeDump):  # read, compressed, hashed off the loop
            result = await pump(dump, compressor, send, stall_timeout=stall, progress=progress)
        else:
            result = await run_pipeline(aiter(dump), compressor, send, stall_timeout=stall,
                                        progress=progress)
        return result, adapter.dump_metadata(dump)


async def _send_data(channel: Channel, data: bytes) -> None:
    channel.check_early_answer()
    step = channel.max_data
    if len(data) <= step:  # the usual case: no copy
        await channel.send(Data(data))
        return
    view = memoryview(data)
    for start in range(0, len(view), step):
        await channel.send(Data(bytes(view[start : start + step])))
