"""Waiting for a condition with a deadline, the tests' one way of waiting for something
to happen instead of sleeping for a guessed while.

A wait ends as soon as its condition holds, so a fast machine does not pay for a slow
one's margin, and a condition that never holds fails naming what was awaited. The
polling interval only bounds how late a wait notices; it is never what a test relies on.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable

POLL = 0.05  # seconds between two looks at a condition


async def wait_for(check: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Return once ``check()`` is truthy, the event loop running on meanwhile; fail
    naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL)


def parked(thread: threading.Thread) -> bool:
    """Whether ``thread`` is waiting on a :class:`threading.Condition` right now.

    Semaphores, events, queues and futures all wait through one, so this says that the
    thread is blocked until another thread lets it go, not reading, computing or
    sleeping.
    """
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code is threading.Condition.wait.__code__:
            return True
        frame = frame.f_back
    return False
