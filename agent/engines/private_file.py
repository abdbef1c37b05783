"""Private files for a client tool's credentials: 0600, in a fresh 0700 directory, in
memory-backed storage when there is some, and removed with their directory on exit.

The MySQL option file and the PostgreSQL passfile are both written here, so that "is
this secret file safe?" has one answer for every tool the agent runs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import DumpError


def private_dir(prefix: str) -> Path:
    """A fresh 0700 directory, in memory-backed storage when there is some to write to.

    Raises:
        DumpError: no such directory can be made anywhere.
    """
    # /dev/shm is world-writable, but mkdtemp makes an unguessable 0700 directory in it.
    candidates = ["/dev/shm", os.environ.get("XDG_RUNTIME_DIR"), None]  # noqa: S108
    for base in candidates:
        if base is not None and not os.access(base, os.W_OK | os.X_OK):
            continue
        with contextlib.suppress(OSError):
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    raise DumpError("cannot create a private directory for the client's credentials")



@contextlib.contextmanager
def private_file(text: str, *, name: str, prefix: str, what: str) -> Iterator[Path]:
    """A 0600 file ``name`` holding ``text``, in a private directory named from ``prefix``;
    both are removed on exit. ``what`` names the file in the error.

    Raises:
        DumpError: the directory or the file cannot be created or written.
    """
    directory = private_dir(prefix)
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        _remove(directory, path)
        raise DumpError(f"cannot write the {what}: {exc.strerror or exc}") from exc
    try:
        yield path
    finally:
        _remove(directory, path)


def _remove(directory: Path, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
