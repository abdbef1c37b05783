"""The pipe pump: a dump's stdout read, compressed and hashed in one thread.

Real pipes fed by a writer thread stand in for the dump tool.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest
import zstandard

from agent.stream.compress_thread import CHUNK, DEPTH, PipeDump, pump
from agent.stream.pipe import GULP, GULP_WAIT, POLL_INTERVAL, PipeReader, PipeStopped
from agent.stream.stages import DumpStalled, Progress
from common.compression import ZstdFrameTracker, make_compressor
from common.errors import DumpError
from tests.waiting import parked, wait_for


class FakeDump:
    """A PipeDump over a real pipe; ``fail`` makes finish() report a failed tool."""

    def __init__(self, fd: int, fail: bool = False) -> None:
        self.reader = PipeReader(fd)
        self.noted = 0
        self.finished = False
        self.fail = fail

    def pipe_reader(self) -> PipeReader:
        return self.reader

    def note_read(self, count: int) -> None:
        self.noted += count

    async def finish(self) -> None:
        self.finished = True
        if self.fail:
            raise DumpError("dump tool exited with status 2")


class Pipe:
    """A real pipe whose ends are closed once, whoever closes them first."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._open = {self.read_fd, self.write_fd}
        self._lock = threading.Lock()
        self.writers: list[threading.Thread] = []

    def close(self, fd: int) -> None:
        with self._lock:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def close_all(self) -> None:
        """Close the read end first: a writer blocked on a full pipe gets EPIPE and ends,
        and is waited for before its descriptor number can be reused."""
        self.close(self.read_fd)
        for thread in self.writers:
            thread.join(timeout=5)
        self.close(self.write_fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    made = Pipe()
    yield made
    made.close_all()


class Writer:
    """Writes ``data`` into the pipe from a thread, as a dump tool would, then closes its
    end. Its writes do not block, so that a full pipe is seen: ``full`` is set while the
    writer waits for room."""

    def __init__(self, pipe: Pipe, data: bytes, *, close: bool = True,
                 piece: int = 100_000) -> None:
        self.written = 0
        self.full = threading.Event()
        self._pipe, self._data, self._close, self._piece = pipe, data, close, piece
        os.set_blocking(pipe.write_fd, False)
        thread = threading.Thread(target=self._run, daemon=True)
        pipe.writers.append(thread)
        thread.start()

    def _run(self) -> None:
        fd = self._pipe.write_fd
        room = select.poll()
        room.register(fd, select.POLLOUT)
        try:
            while self.written < len(self._data):
                start = self.written
                try:
                    self.written += os.write(fd, self._data[start : start + self._piece])
                except BlockingIOError:
                    self.full.set()
                    room.poll()  # the test closing the read end ends this wait too
                    self.full.clear()
        except OSError:  # the test is over and closed the pipe
            return
        if self._close:
            self._pipe.close(fd)


def sample(size: int) -> bytes:
    line = b"INSERT INTO `t` VALUES (1,'some text',0x00ff,NULL);\n"
    data = (line * (size // len(line) + 1))[:size]
    return data[: size // 2] + os.urandom(4096) + data[size // 2 :]


def pump_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "backhaul-dump-pump"]


async def test_output_decompresses_to_the_dump_and_its_digest_is_of_what_was_sent(
    pipe: Pipe,
) -> None:
    read_fd = pipe.read_fd
    data = sample(5 * CHUNK + 12345)
    Writer(pipe, data)
    dump = FakeDump(read_fd)
    sent: list[bytes] = []

    async def send(out: bytes) -> None:
        sent.append(out)

    progress = Progress()
    result = await pump(dump, make_compressor("zstd"), send, progress=progress)
    stream = b"".join(sent)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stream) == data
    assert result.sha256 == hashlib.sha256(stream).hexdigest()
    assert result.byte_count == len(stream) == progress.sent_bytes
    assert result.raw_bytes == len(data) == dump.noted == progress.raw_bytes
    assert dump.finished
    assert not pump_threads()


async def test_gzip_and_an_empty_dump_still_make_a_whole_stream(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    pipe.close(pipe.write_fd)
    dump = FakeDump(read_fd)
    sent: list[bytes] = []

    async def send(out: bytes) -> None:
        sent.append(out)

    result = await pump(dump, make_compressor("gzip"), send)
    import gzip

    assert gzip.decompress(b"".join(sent)) == b""
    assert result.raw_bytes == 0 and result.byte_count > 0 and dump.finished


async def test_a_failed_dump_tool_keeps_the_last_bytes_back(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    Writer(pipe, sample(100_000))
    dump = FakeDump(read_fd, fail=True)
    sent: list[bytes] = []

    async def send(out: bytes) -> None:
        sent.append(out)

    with pytest.raises(DumpError, match="status 2"):
        await pump(dump, make_compressor("zstd"), send)
    # The end of the stream (the compressor's flush) is never sent for a failed tool:
    # what went out, if anything, is not a whole zstd frame.
    tracker = ZstdFrameTracker()
    tracker.feed(b"".join(sent))
    assert not tracker.eof
    assert not pump_threads()


async def test_a_silent_dump_stalls_and_the_thread_is_stopped(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    os.write(pipe.write_fd, b"-- MariaDB dump\n")  # then nothing, and the pipe stays open
    dump = FakeDump(read_fd)

    async def send(out: bytes) -> None:
        pass

    started = time.monotonic()
    with pytest.raises(DumpStalled, match="no bytes for 1 s"):
        await pump(dump, make_compressor("zstd"), send, stall_timeout=0.6)
    assert time.monotonic() - started < 5
    assert dump.noted == 16
    assert not pump_threads()
    assert dump.reader.stopped.is_set()


async def test_a_failing_send_stops_the_thread_and_is_raised_as_is(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    Writer(pipe, sample(20 * CHUNK), close=False)

    class Cut(Exception):
        pass

    async def send(out: bytes) -> None:
        raise Cut("connection lost")

    dump = FakeDump(read_fd)
    with pytest.raises(Cut):
        await pump(dump, make_compressor("zstd"), send)
    assert not pump_threads()
    assert dump.noted < 20 * CHUNK


async def test_a_slow_sender_holds_the_dump_back(pipe: Pipe) -> None:
    total = 64 * CHUNK
    source = Writer(pipe, os.urandom(total))
    dump = FakeDump(pipe.read_fd)
    sending = asyncio.Event()
    release = asyncio.Event()

    async def send(out: bytes) -> None:
        sending.set()
        await release.wait()

    task = asyncio.create_task(pump(dump, make_compressor("zstd"), send))
    await asyncio.wait_for(sending.wait(), 10)
    (thread,) = pump_threads()
    # Held back for good: the thread waits for a free hand-over slot, and the writer
    # for room in the pipe, which nobody reads any more.
    await wait_for(lambda: parked(thread) and source.full.is_set(),
                   "the pump thread and the writer to wait for the sender", timeout=10)
    # The first send is blocked: the thread has read DEPTH more pieces and holds one,
    # and the pipe is full; no more.
    capacity = fcntl.fcntl(pipe.read_fd, fcntl.F_GETPIPE_SZ)
    assert CHUNK < source.written <= (DEPTH + 2) * CHUNK + capacity
    release.set()
    result = await task
    assert result.raw_bytes == total


async def test_the_pump_is_a_pipe_dump_protocol_match() -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert isinstance(FakeDump(read_fd), PipeDump)
        assert not isinstance(object(), PipeDump)
    finally:
        os.close(read_fd)
        os.close(write_fd)


# -- the reader ----------------------------------------------------------------------------------


def test_reader_fills_the_buffer_while_bytes_keep_coming(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    Writer(pipe, b"x" * (3 * CHUNK), piece=4096)
    reader = PipeReader(read_fd)
    buffer = memoryview(bytearray(CHUNK))
    assert reader.readinto(buffer) == (CHUNK, False)


def test_reader_returns_what_it_has_once_the_writer_pauses(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    os.write(pipe.write_fd, b"abc")
    reader = PipeReader(read_fd)
    buffer = memoryview(bytearray(CHUNK))
    started = time.monotonic()
    assert reader.readinto(buffer) == (3, False)
    assert time.monotonic() - started < 1
    pipe.close(pipe.write_fd)
    assert reader.readinto(buffer) == (0, True)


def test_a_stopped_reader_gives_up_within_its_poll_interval(pipe: Pipe) -> None:
    read_fd = pipe.read_fd
    reader = PipeReader(read_fd)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader.readinto(memoryview(bytearray(16)))
        except PipeStopped as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    # The wait is what is tested: with nothing to read, the reader is still waiting
    # several poll intervals later (and is then surely inside its poll when stopped).
    thread.join(timeout=3 * POLL_INTERVAL)
    assert thread.is_alive(), "nothing to read: the reader waits"
    reader.stop()
    thread.join(timeout=5 * POLL_INTERVAL)
    assert not thread.is_alive() and len(outcome) == 1


def test_reader_waits_for_the_pipe_to_fill_after_a_short_read(pipe: Pipe) -> None:
    pieces = [b"%d" % i * 4096 for i in range(10)]
    os.write(pipe.write_fd, pieces[0])
    waits: list[float] = []

    def pause(seconds: float) -> None:
        # Each pause lets the "dump tool" write one more 4 KiB piece, then it ends.
        waits.append(seconds)
        if len(waits) < len(pieces):
            os.write(pipe.write_fd, pieces[len(waits)])
        else:
            pipe.close(pipe.write_fd)

    buffer = memoryview(bytearray(CHUNK))
    count, ended = PipeReader(pipe.read_fd, pause=pause).readinto(buffer)
    assert (count, ended) == (sum(map(len, pieces)), True)
    assert bytes(buffer[:count]) == b"".join(pieces)
    assert waits == [GULP_WAIT] * len(pieces)


def test_reader_does_not_wait_while_reads_come_back_full(pipe: Pipe) -> None:
    waits: list[float] = []
    os.write(pipe.write_fd, b"x" * GULP)
    reader = PipeReader(pipe.read_fd, pause=waits.append)
    assert reader.readinto(memoryview(bytearray(GULP))) == (GULP, False)
    assert waits == []
