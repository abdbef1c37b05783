"""dump → compressor → SHA-256 → sender, as three concurrent stages with bounded queues.

The dump is read continuously while the previous chunk is compressed in a worker
thread and the one before is on the wire, so the dump tool, zstd and SSH overlap on
separate cores. Each queue holds a few chunks at most: memory stays bounded whatever the
database size, and a slow collector stalls the dump tool through its stdout pipe.
Nothing touches the database host's disk.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from common.compression import Compressor
from common.errors import DumpError

QUEUE_DEPTH = 4


class DumpStalled(DumpError):
    """The dump produced no bytes for the source's stall_timeout."""
_DONE = b""
T = TypeVar("T")


@dataclass
class StreamResult:
    raw_bytes: int
    byte_count: int
    sha256: str


class Progress:
    """Counters the runner can show while the stream runs."""

    def __init__(self) -> None:
        self.raw_bytes = 0
        self.sent_bytes = 0


async def _next_with_stall(iterator: AsyncIterator[bytes], stall_timeout: float) -> bytes | None:
    try:
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation
        # that races with the result, leaving this stage blocked forever.
        async with asyncio.timeout(stall_timeout):
            return await anext(iterator)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DumpStalled(f"dump stalled: no bytes for {stall_timeout:.0f} s") from None


async def run_pipeline(
    chunks: AsyncIterator[bytes],
    compressor: Compressor,
    send: Callable[[bytes], Awaitable[None]],
    *,
    stall_timeout: float = 600.0,
    progress: Progress | None = None,
) -> StreamResult:
    """Stream ``chunks`` through compression and hashing into ``send``.

    Raises:
        DumpError: the dump failed or stalled (from ``chunks``).
        Whatever ``send`` raises (transport errors, a collector REJECT).
    """
    stages = _Stages(compressor, progress or Progress())
    await _run_all(stages.read(chunks, stall_timeout), stages.squeeze(), stages.ship(send))
    return stages.result()


class _Stages:
    """The stages of one stream and what they share: two bounded queues, the digest and
    the counters. A chunk of ``_DONE`` ends each queue."""

    def __init__(self, compressor: Compressor, progress: Progress) -> None:
        self._compressor = compressor
        self._progress = progress
        self._digest = hashlib.sha256()
        self._raw: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_DEPTH)
        self._out: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_DEPTH)

    async def read(self, chunks: AsyncIterator[bytes], stall_timeout: float) -> None:
        """The dump's chunks into the raw queue."""
        while (chunk := await _next_with_stall(chunks, stall_timeout)) is not None:
            if chunk:
                self._progress.raw_bytes += len(chunk)
                await self._raw.put(chunk)
        await self._raw.put(_DONE)

    async def squeeze(self) -> None:
        """The raw queue through compression and SHA-256 (in a worker thread) into the
        out queue; the end flushes the compressor."""
        while True:
            chunk = await self._raw.get()
            out = await asyncio.to_thread(self._compress, chunk)
            if out:
                await self._out.put(out)
            if chunk is _DONE or not chunk:
                await self._out.put(_DONE)
                return

    def _compress(self, chunk: bytes) -> bytes:
        out = self._compressor.compress(chunk) if chunk else self._compressor.flush()
        self._digest.update(out)
        return out

    async def ship(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """The out queue into ``send``."""
        while out := await self._out.get():
            await send(out)
            self._progress.sent_bytes += len(out)

    def result(self) -> StreamResult:
        return StreamResult(self._progress.raw_bytes, self._progress.sent_bytes,
                            self._digest.hexdigest())


async def _run_all(*stages: Awaitable[None]) -> None:
    """Run the stages together; the first failure cancels the rest and is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            for stage in stages:
                group.create_task(stage)  # type: ignore[arg-type]
    except BaseExceptionGroup as group_error:
        raise _first(group_error) from None


def _first(error: BaseExceptionGroup[BaseException]) -> BaseException:
    inner = error.exceptions[0]
    return _first(inner) if isinstance(inner, BaseExceptionGroup) else inner
