"""Secrets: password files read under one rule, and passwords kept out of messages.

Every password Backhaul uses (a database source's, the SMTP relay's) comes from a file
the administrator controls; :func:`read_secret_file` is the one place that decides
whether such a file is safe to use. :func:`scrub` is the last guard before a message
that might echo a password (a server's error, a tool's stderr) is logged or sent.
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

    The rule: a regular file whose mode grants nothing to group or others (0600, 0400
    or stricter), holding the password on one line; a trailing newline (or CRLF) is
    dropped, every other character, spaces included, is part of the password.
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
        _check_mode(os.fstat(fd).st_mode, path, where)
        data = _read(fd, path, where)
    finally:
        os.close(fd)
    return _one_line(data, path, where)


def check_owner_only(mode: int, path: Path, what: str) -> None:
    """Refuse a secret file whose ``mode`` grants anything to group or others.

    ``what`` names the file's role (``"CA key"``) and starts the message, which says
    who can read it and the command that fixes it.

    Raises:
        ConfigError: any group or other permission bit is set.
    """
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} is {_exposure(mode)} "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )


def _check_mode(mode: int, path: Path, where: str) -> None:
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: cannot read password file {path}: it is not a regular file")
    check_owner_only(mode, path, f"{where}: password file")


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
    if mode & 0o040:
        return "readable by its group"
    return "open to its group or others"


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
