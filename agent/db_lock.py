"""One backup, restore or drill of a database at a time on this host: a lock per database.

The lock is an flock(2) on ``<run_dir>/locks/<source>/<database>.lock`` (names in the
file-name encoding of :func:`common.naming.encode_database`), taken by the service for
each scheduled backup and by the one-shot ``backup``, ``restore`` and ``drill`` commands.
The kernel releases an flock when its holder dies, however it dies, so a lock left by a
killed process never blocks anyone: the file may stay, the lock does not.

While held, the file says who holds it (pid, command, since), so that the second comer
can say so; it either waits (``--wait``) or gives up touching nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.shared_dirs import make_shared_folder
from common.errors import BackhaulError, ConfigError, ExitCode
from common.fsutil import give_to_folder_owner
from common.naming import encode_database
from common.text import escape_control

log = logging.getLogger(__name__)
POLL_INTERVAL = 0.5  # seconds between attempts while waiting for a lock
_HOLDER_MAX = 4096


class DatabaseBusyError(BackhaulError):
    """Another backup, restore or drill of the database runs on this host; retrying later
    (or waiting) helps."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class Holder:
    """Who holds a database's lock, as its file says."""

    pid: int | None
    command: str
    since: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "an unknown process"
        return f"{pid} ({escape_control(self.command)}) since {self.since}"


class DatabaseLock:
    """The lock of one database; :meth:`try_acquire` then :meth:`release`."""

    def __init__(self, run_dir: Path, source: str, database: str, command: str) -> None:
        self.run_dir = run_dir
        folder = run_dir / "locks" / encode_database(source)
        self.path = folder / f"{encode_database(database)}.lock"
        self.label = f"{source}/{escape_control(database)}"
        self.command = command
        self._fd: int | None = None

    def try_acquire(self) -> Holder | None:
        """Take the lock if it is free: None then, else who holds it.

        Raises:
            ConfigError: the lock file cannot be made or opened (run_dir, permissions).
        """
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_holder(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # nobody holds it; closing releases the flock
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        try:
            make_shared_folder(self.path.parent, self.run_dir)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # Fail closed: without the lock nothing keeps two dumps of the database apart.
            raise ConfigError(
                f"cannot open the lock of {self.label} ({self.path}): {exc.strerror}; run as "
                "the service's user or root, or set [agent] run_dir"
            ) from None
        with contextlib.suppress(OSError):
            give_to_folder_owner(fd, self.run_dir)
        return fd

    def _write_holder(self, fd: int) -> None:
        text = json.dumps({
            "pid": os.getpid(),
            "command": self.command,
            "since": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
        })
        with contextlib.suppress(OSError):  # the flock is what counts; the text is a courtesy
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)


@contextlib.asynccontextmanager
async def hold_database(
    run_dir: Path, source: str, database: str, command: str, *, wait: bool
) -> AsyncIterator[None]:
    """Hold the lock of ``source``/``database`` for the body.

    Raises:
        DatabaseBusyError: another process holds it and ``wait`` is False (nothing was
            touched).
        ConfigError: the lock cannot be opened.
    """
    lock = DatabaseLock(run_dir, source, database, command)
    holder = lock.try_acquire()
    if holder is not None:
        if not wait:
            raise DatabaseBusyError(
                f"{lock.label} is busy: {holder.describe()} holds its lock {lock.path}; "
                "try later, or pass --wait"
            )
        log.warning("%s is busy: %s holds its lock; waiting", lock.label, holder.describe())
        # Polling, not a blocking flock in a thread: a thread stuck in flock(2) cannot be
        # cancelled, and would take the lock after its waiter had gone.
        while (holder := lock.try_acquire()) is not None:  # noqa: ASYNC110 - another process
            await asyncio.sleep(POLL_INTERVAL)
        log.info("%s: lock taken after waiting", lock.label)
    try:
        yield
    finally:
        lock.release()


def _read_holder(fd: int) -> Holder:
    try:
        data = json.loads(os.pread(fd, _HOLDER_MAX, 0).decode("utf-8"))
        pid = data.get("pid")
        return Holder(
            pid if isinstance(pid, int) else None,
            str(data.get("command", "?")),
            str(data.get("since", "?")),
        )
    except (OSError, ValueError, AttributeError):
        # Between another's flock and its write, or a holder from an older version.
        return Holder(None, "unknown command", "an unknown time")

