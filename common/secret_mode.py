"""Whether a secret file (private key, password file) is safe to use: one rule, here.

As OpenSSH refuses an unprotected private key, Backhaul refuses a secret that anyone
but its owner and the service may read. Allowed: no access at all for "others"; group
access only on a file owned by root, which is the layout of backhaul.tmpfiles.conf
(owner root, group the service's, mode 0640): the group is how the service reads a
secret it cannot change. A secret owned by any other account must be 0600 or stricter.
"""

from __future__ import annotations

import stat
from pathlib import Path

from common.errors import ConfigError


def check_secret_file(path: Path, what: str, where: str) -> None:
    """Refuse a missing secret file or one others may read, naming the fix.

    ``what`` names the file for the message ("private key", "password file"); ``where``
    is the configuration key that points at it.

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, or too open.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}: {what} {path} is not a regular file")
    try:
        path.open("rb").close()  # readable by this process, which may be the service's user
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read {what} {path}: {exc.strerror}; the service's user reads it "
            "through its group (owner root, group of the service, chmod 640)"
        ) from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007 or (info.st_uid != 0 and mode & 0o070):
        who = "others" if mode & 0o007 else "its group"
        raise ConfigError(
            f"{where}: {what} {path} is accessible by {who} (mode {mode:04o}); refusing it, "
            f"as OpenSSH refuses an unprotected key. Fix: chmod 600 {path} (or owner root, "
            "group of the service, chmod 640)"
        )
