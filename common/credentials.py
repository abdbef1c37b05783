"""Secrets: secret files checked under one rule, and passwords kept out of messages.

Every password and private key Backhaul uses (a database source's password, the SMTP
relay's, the agent's and the collector's SSH keys, the CA key) is in a file the
administrator controls; :func:`check_secret_mode` is the one rule that decides whether
such a file is safe to use, :func:`read_secret_file` reads a password file under it and
:func:`check_secret_file` checks a key file before it is used. :func:`scrub` is the last
guard before a message that might echo a password (a server's error, a tool's stderr) is
logged or sent.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote, quote_plus

from common.errors import ConfigError

MASK = "***"
_MAX_SIZE = 64 * 1024  # far beyond any password; stops a mistaken path being read whole


def read_secret_file(path: Path, where: str) -> str:
    """Read a password file: exactly one line, for its owner's eyes only.

    The rule: a regular file that :func:`check_secret_mode` accepts (0600, 0400, or
    0640 owned by root with the service's group), holding the password on one line; a
    trailing newline (or CRLF) is dropped, every other character, spaces included, is
    part of the password.
    ``where`` names the setting that points at the file (``"source db1"``,
    ``"collector.toml: notify.email.password_file"``) and starts every message.

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, open to group
            or others, not UTF-8, empty or longer than one line. The message names the
            file and what to do; it never quotes the file's content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read password file {path}: {exc.strerror}") from None
    try:
        _check_mode(os.fstat(fd), path, where)
        data = _read(fd, path, where)
    finally:
        os.close(fd)
    return _one_line(data, path, where)


def check_secret_mode(
    info: os.stat_result, path: Path, what: str, *, service_group: bool = True
) -> None:
    """Refuse a secret file that someone besides its owner and the service may read.

    As OpenSSH refuses an unprotected private key: nothing for others, ever; nothing for
    the group either, except on a file owned by root when ``service_group`` is true, which
    is the installed layout (owner root, group the service's, mode 0640: the group is how
    the service reads a secret it cannot change). A file only its owner uses (the CA key)
    passes ``service_group=False``. ``what`` names the file (``"source db1: password
    file"``) and starts the message, which says who can read it and the fix.

    Raises:
        ConfigError: the file is open to others, or to its group where that is not allowed.
    """
    mode = stat.S_IMODE(info.st_mode)
    group_ok = service_group and info.st_uid == 0
    if mode & 0o007 or (mode & 0o070 and not group_ok):
        fix = f"chmod 600 {path}" + (
            " (or owner root, group of the service, chmod 640)" if service_group else ""
        )
        raise ConfigError(
            f"{what} {path} is {_exposure(mode)} (mode {mode:04o}); refusing it, as OpenSSH "
            f"refuses an unprotected key. Fix: {fix}"
        )


def check_secret_file(path: Path, what: str, where: str) -> None:
    """Refuse a missing secret file (a private key, a password file), one this process
    cannot read, or one too open (:func:`check_secret_mode`), naming the fix. ``where`` is
    the configuration key that points at it.

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
    check_secret_mode(info, path, f"{where}: {what}")


def _check_mode(info: os.stat_result, path: Path, where: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{where}: cannot read password file {path}: it is not a regular file")
    check_secret_mode(info, path, f"{where}: password file")


def _read(fd: int, path: Path, where: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= _MAX_SIZE and (chunk := os.read(fd, _MAX_SIZE + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read password file {path}: {exc.strerror}") from None
    return b"".join(chunks)


def _exposure(mode: int) -> str:
    if mode & 0o004:
        return "readable by everyone"
    if mode & 0o007:
        return "open to others"
    if mode & 0o040:
        return "readable by its group"
    return "open to its group"


def _one_line(data: bytes, path: Path, where: str) -> str:
    if len(data) > _MAX_SIZE:
        raise ConfigError(f"{where}: password file {path} is too large for a password")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: password file {path} is not UTF-8") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(
            f"{where}: password file {path} is empty; "
            "it must hold the password on exactly one line"
        )
    if "\n" in secret or "\r" in secret:
        raise ConfigError(
            f"{where}: password file {path} must hold the password on exactly one line"
        )
    return secret


def scrub(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every secret, as typed or URL-quoted, replaced by ``***``.

    Belt and braces: no server, driver or tool should echo a password, but if one does
    (a MongoDB URI in an error, a client's stderr), it does not reach a log or the
    collector. Every non-empty secret is masked, however short: a mangled message is
    better than a leaked password.
    """
    forms = {
        form
        for secret in secrets
        if secret
        for form in (secret, quote_plus(secret), quote(secret, safe=""))
    }
    for form in sorted(forms, key=len, reverse=True):  # longest first: one may hold another
        text = text.replace(form, MASK)
    return text
