"""Blocking reads of a dump tool's stdout pipe, for worker threads, that can be called off.

A thread blocked in ``read(2)`` cannot be woken; a dump that stops writing would hold it
(and, through it, the pipe's descriptor) for as long as the tool lives. Here every read
is preceded by ``poll(2)`` with a short timeout, so a reader notices within
``POLL_INTERVAL`` that it has been stopped, and its owner can then close the descriptor
knowing no thread will touch it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import threading
import time
from collections.abc import Callable

POLL_INTERVAL = 0.1  # seconds a stopped reader may take to notice
PIPE_SIZE = 1024 * 1024  # the dump tool may run this far ahead of the reader
GULP = 64 * 1024  # a read shorter than this means the reader has caught up with the writer
GULP_WAIT = 0.002  # seconds to let the pipe fill then; at 100 MB/s about 200 KB


class PipeStopped(Exception):
    """The reader was stopped while waiting for bytes."""


def widen(fd: int) -> None:
    """Let the writer run ``PIPE_SIZE`` ahead of us instead of the default 64 KiB.

    Optional: capped by /proc/sys/fs/pipe-max-size.
    """
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class PipeReader:
    """Fills buffers from the read end ``fd`` of a pipe; used from one thread at a time.

    ``pause`` is how the reader lets the pipe fill (:func:`time.sleep`); a test gives
    its own to play the writer between reads.
    """

    def __init__(self, fd: int, *, pause: Callable[[float], None] = time.sleep) -> None:
        self.fd = fd
        self._pause = pause
        self.stopped = threading.Event()
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def stop(self) -> None:
        """Make a waiting or later read raise :class:`PipeStopped` (from any thread)."""
        self.stopped.set()

    def readinto(self, view: memoryview) -> tuple[int, bool]:
        """Read into ``view`` until it is full, the pipe ends, or the writer pauses.

        Returns the byte count and whether the pipe has ended. While bytes keep coming
        the buffer is filled whole (fewer, larger hand-overs), pausing ``GULP_WAIT``
        after a short read; once some bytes are in and the writer has been quiet for
        ``POLL_INTERVAL``, they are returned as they are, so a slow dump still shows
        progress.

        Raises:
            PipeStopped: :meth:`stop` was called.
            OSError: reading failed.
        """
        got = 0
        timeout_ms = int(POLL_INTERVAL * 1000)
        while got < len(view):
            if self.stopped.is_set():
                raise PipeStopped
            if not self._poller.poll(timeout_ms):
                if got:
                    return got, False
                continue
            count = os.readv(self.fd, [view[got:]])
            if count == 0:
                return got, True
            got += count
            if count < GULP and got < len(view):
                # The writer is only just ahead (a dump tool without stdbuf writes 4 KiB
                # at a time): let the pipe fill a little instead of waking for every
                # write. 85,000 reads per GB became a few thousand, and the dump tool's
                # writes stop waking us: 0.3 CPU-s less here and 0.2 s less in the tool
                # per GB.
                self._pause(GULP_WAIT)
        return got, False
