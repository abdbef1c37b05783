"""Folders the agent's service and its one-shot commands share (state and locks): made
private (0700), and given to the folder's owner when root makes something in them.

An administrator may run `backhaul-agent backup` as root while the service runs as its
own user; a file root leaves behind must still be usable by the service.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common.fsutil import give_to_folder_owner


def make_shared_folder(folder: Path, top: Path) -> None:
    """Create ``folder`` (inside ``top``, at most two levels down) and what is missing
    between them, each 0700 and owned like ``top``.

    Raises:
        OSError: a folder cannot be made.
    """
    top.mkdir(mode=0o700, parents=True, exist_ok=True)
    for part in (folder.parent, folder):
        if part == top or not part.is_relative_to(top):
            continue
        with contextlib.suppress(FileExistsError):
            part.mkdir(mode=0o700)
            fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY)
            try:
                give_to_folder_owner(fd, top)
            finally:
                os.close(fd)
