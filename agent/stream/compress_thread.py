"""A dump tool's stdout read, compressed and hashed in one worker thread.

The raw dump is most of a backup's bytes: five times its compressed size and more.
Read by the event loop, each byte was copied three times in Python (the pipe
transport's buffer, the stream reader's, the chunk handed to the compressor) and every
256 KiB cost a loop iteration and a thread hand-over; that was a sixth of the agent's
CPU. Here one thread reads the pipe into a reused 1 MiB buffer and gives it straight to
the compressor and to SHA-256 (both release the GIL while they work), so only the
compressed bytes reach the event loop, which sends them.

The hand-over is bounded (``DEPTH`` pieces): when SSH is slower than the dump, the
thread waits, the pipe fills and the dump tool blocks. A dump that writes nothing for
``stall_timeout`` raises :class:`~agent.stream.stages.DumpStalled`. The thread never outlives
:func:`pump`: it is stopped and waited for on every way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agent.stream.pipe import POLL_INTERVAL, PipeReader, PipeStopped
from agent.stream.stages import DumpStalled, Progress, StreamResult
from common.compression import Compressor
from common.errors import DumpError

CHUNK = 1024 * 1024
DEPTH = 4  # compressed pieces the thread may run ahead of the sender


@runtime_checkable
class PipeDump(Protocol):
    """A dump whose output is a pipe (MySQL's dump tools)."""

    def pipe_reader(self) -> PipeReader: ...
    def note_read(self, count: int) -> None: ...
    async def finish(self) -> None: ...


@dataclass(frozen=True)
class _Piece:
    raw: int  # dump bytes read since the previous piece
    out: bytes  # what the compressor gave for them (may be empty)
    last: bool  # the pipe has ended and ``out`` includes the compressor's flush


class _Worker:
    """The thread's side: read, compress, hash, hand over; stops when told."""

    def __init__(self, reader: PipeReader, compressor: Compressor,
                 deliver: Callable[[_Piece | BaseException], None]) -> None:
        self.reader = reader
        self.compressor = compressor
        self.digest = hashlib.sha256()
        self.slots = threading.Semaphore(DEPTH)
        self._deliver = deliver

    def run(self) -> None:
        try:
            self._pump()
        except PipeStopped:
            pass
        except OSError as exc:
            self._hand_over(DumpError(f"reading the dump's output failed: {exc}"))
        except Exception as exc:  # a compressor failure: reported, not lost in a thread
            self._hand_over(exc)

    def _pump(self) -> None:
        buffer = memoryview(bytearray(CHUNK))
        while True:
            count, ended = self.reader.readinto(buffer)
            out = self.compressor.compress(buffer[:count]) if count else b""
            if ended:
                out += self.compressor.flush()
            if out:
                self.digest.update(out)
            if count or ended:
                self._hand_over(_Piece(count, out, ended))
            if ended:
                return

    def _hand_over(self, item: _Piece | BaseException) -> None:
        while not self.slots.acquire(timeout=0.1):
            if self.reader.stopped.is_set():
                raise PipeStopped
        self._deliver(item)


async def pump(
    dump: PipeDump,
    compressor: Compressor,
    send: Callable[[bytes], Awaitable[None]],
    *,
    stall_timeout: float = 600.0,
    progress: Progress | None = None,
) -> StreamResult:
    """Stream ``dump``'s output through ``compressor`` and SHA-256 into ``send``.

    Returns once the dump tool has ended well (:meth:`PipeDump.finish`) and the last
    compressed bytes are sent.

    Raises:
        DumpError: the dump failed, stalled or could not be read.
        Whatever ``send`` raises (transport errors, a collector REJECT).
    """
    progress = progress or Progress()
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[_Piece | BaseException] = asyncio.Queue()
    reader = dump.pipe_reader()

    def deliver(item: _Piece | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(pieces.put_nowait, item)

    worker = _Worker(reader, compressor, deliver)
    ended = asyncio.Event()

    def run() -> None:
        try:
            worker.run()
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ended.set)

    thread = threading.Thread(target=run, name="backhaul-dump-pump", daemon=True)
    thread.start()
    try:
        while True:
            item = await _next(pieces, stall_timeout)
            worker.slots.release()
            if isinstance(item, BaseException):
                raise item
            if item.raw:
                dump.note_read(item.raw)
                progress.raw_bytes += item.raw
            if item.last:
                await dump.finish()  # the exit status, before the last bytes go out
            if item.out:
                await send(item.out)
                progress.sent_bytes += len(item.out)
            if item.last:
                return StreamResult(progress.raw_bytes, progress.sent_bytes,
                                    worker.digest.hexdigest())
    finally:
        reader.stop()  # the thread notices within the reader's poll interval
        try:
            await asyncio.shield(ended.wait())
        finally:
            # Its last step is done; joining takes no time. Cancelled again while
            # waiting, this still leaves no thread behind: the dump's pipe closes next.
            thread.join(timeout=2 * POLL_INTERVAL)


async def _next(pieces: asyncio.Queue[_Piece | BaseException],
                stall_timeout: float) -> _Piece | BaseException:
    try:
        async with asyncio.timeout(stall_timeout):
            return await pieces.get()
    except TimeoutError:
        raise DumpStalled(f"dump stalled: no bytes for {stall_timeout:.0f} s") from None
