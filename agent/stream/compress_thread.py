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


class _Thread:
    """The worker's thread and its hand-over to the event loop (``pieces``)."""

    def __init__(self, reader: PipeReader, compressor: Compressor) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self.pieces: asyncio.Queue[_Piece | BaseException] = asyncio.Queue()
        self.worker = _Worker(reader, compressor, self._deliver)
        self._ended = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="backhaul-dump-pump",
                                        daemon=True)

    def _deliver(self, item: _Piece | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(self.pieces.put_nowait, item)

    def _run(self) -> None:
        try:
            self.worker.run()
        finally:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._ended.set)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop the thread and wait for it: it never outlives :func:`pump`."""
        self._reader.stop()  # the thread notices within the reader's poll interval
        try:
            await asyncio.shield(self._ended.wait())
        finally:
            # Its last step is done; joining takes no time. Cancelled again while
            # waiting, this still leaves no thread behind: the dump's pipe closes next.
            self._thread.join(timeout=2 * POLL_INTERVAL)


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
    thread = _Thread(dump.pipe_reader(), compressor)
    thread.start()
    try:
        return await _send_pieces(thread, dump, send, stall_timeout, progress or Progress())
    finally:
        await thread.stop()


async def _send_pieces(thread: _Thread, dump: PipeDump, send: Callable[[bytes], Awaitable[None]],
                       stall_timeout: float, progress: Progress) -> StreamResult:
    """Send what the thread hands over, in order, through its last piece."""
    while True:
        item = await _next(thread.pieces, stall_timeout)
        thread.worker.slots.release()
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
                                thread.worker.digest.hexdigest())


async def _next(pieces: asyncio.Queue[_Piece | BaseException],
                stall_timeout: float) -> _Piece | BaseException:
    try:
        async with asyncio.timeout(stall_timeout):
            return await pieces.get()
    except TimeoutError:
        raise DumpStalled(f"dump stalled: no bytes for {stall_timeout:.0f} s") from None
