"""File-system durability and exclusion: folder fsync, advisory lock files, ownership.

Blocking calls; the collector runs them in worker threads or in its one-shot commands.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from common.errors import StorageError

LOCK_MODE = 0o640  # same user and the admin group, like the files the lock guards


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new name, a removed one) durable.

    Raises:
        OSError: the folder cannot be opened or synced (callers name it in their error).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def give_to_folder_owner(fd: int, folder: Path) -> None:
    """When run by root, hand the open file to ``folder``'s owner and group.

    A command an administrator runs as root must not leave files in the store that the
    collector's own user can no longer replace or lock.
    """
    if os.geteuid() == 0:
        st = os.stat(folder)
        os.fchown(fd, st.st_uid, st.st_gid)


@contextlib.contextmanager
def file_lock(folder: Path, name: str, *, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an exclusive flock on ``<folder>/<name>``, creating the lock file if needed.

    With ``wait=False`` fail at once if another process holds it, saying ``busy``. The
    lock is released when the block ends or the process dies, so it never goes stale.

    Raises:
        StorageError: the lock file cannot be opened, or it is held and ``wait`` is False.
    """
    path = folder / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
    except OSError as exc:
        raise StorageError(f"cannot open the lock {path}: {exc.strerror}") from None
    try:
        give_to_folder_owner(fd, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(busy or f"another process holds {path}") from None
        yield
    finally:
        os.close(fd)
