"""The revocation list: which keys and certificates the collector refuses, and from when.

The list is kept apart from authentication policy because both the collector (which
enforces it) and the CA tooling (which writes it) need it, and because it is a file an
operator edits while the collector runs.

Format: UTF-8 text, one entry per line, ``#`` starts a comment::

    key SHA256:<base64>      a public key: an agent key, a certificate's key or a CA key
    serial <decimal>         certificates with this serial number (issued by our CA)
    key-id <id>              certificates with this key id

Any entry may end with ``from <yyyy-mm-ddThh:mm:ssZ>``: it takes effect at that UTC time,
which gives a rotated key a grace period. :class:`RevocationSource` re-reads the file when
it changes; a file it cannot read or parse refuses every agent until it is fixed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Literal

from common.certificates import CertificateInfo, format_time, parse_time
from common.errors import ConfigError

logger = logging.getLogger(__name__)

_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_KEY_ID = re.compile(r"[^\s#]{1,256}")

RevocationKind = Literal["key", "serial", "key-id"]
_KINDS: tuple[RevocationKind, ...] = ("key", "serial", "key-id")


@dataclasses.dataclass(frozen=True)
class RevocationEntry:
    """One line of the revocation list; ``effective`` is when it starts to apply."""

    kind: RevocationKind
    value: str
    effective: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "key" and not _FINGERPRINT.fullmatch(self.value):
            raise ValueError(f"not a SHA256 key fingerprint: {self.value!r}")
        if self.kind == "serial" and not (
            self.value.isdigit() and self.value.isascii() and int(self.value) < 2**64
        ):
            raise ValueError(f"not a certificate serial number: {self.value!r}")
        if self.kind == "key-id" and not _KEY_ID.fullmatch(self.value):
            raise ValueError(f"not a usable key id: {self.value!r}")

    def format(self) -> str:
        """Return the entry as a line of the revocation list (without newline)."""
        line = f"{self.kind} {self.value}"
        return line if self.effective is None else f"{line} from {format_time(self.effective)}"

    def applies(self, now: float) -> bool:
        """Return whether the entry is in force at ``now``."""
        return self.effective is None or now >= self.effective


@dataclasses.dataclass(frozen=True)
class RevocationList:
    """A parsed revocation list."""

    entries: tuple[RevocationEntry, ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = "<revocation list>") -> RevocationList:
        """Parse the text format; raises ConfigError naming ``source`` and the line."""
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            words = raw.split("#", 1)[0].split()
            if not words:
                continue
            try:
                entries.append(_parse_entry(words))
            except ValueError as exc:
                raise ConfigError(f"{source}, line {number}: {exc}") from None
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> RevocationList:
        """Read and parse ``path``; raises ConfigError if it is unreadable or malformed."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read revocation list {path}: {exc}") from None
        return cls.parse(text, str(path))

    def revokes_key(self, fingerprint: str, now: float) -> bool:
        """Return whether a key with this SHA256 fingerprint is revoked at ``now``."""
        return self._match("key", fingerprint, now)

    def revokes_certificate(self, info: CertificateInfo, now: float) -> bool:
        """Return whether the certificate, its key or its CA is revoked at ``now``."""
        return (
            self._match("serial", str(info.serial), now)
            or self._match("key-id", info.key_id, now)
            or self._match("key", info.key_fingerprint, now)
            or self._match("key", info.ca_fingerprint, now)
        )

    def _match(self, kind: RevocationKind, value: str, now: float) -> bool:
        return any(e.kind == kind and e.value == value and e.applies(now) for e in self.entries)


def _parse_entry(words: list[str]) -> RevocationEntry:
    effective = None
    if len(words) == 4 and words[2] == "from":
        try:
            effective = parse_time(words[3])
        except ValueError:
            raise ValueError(f"bad time {words[3]!r}; expected yyyy-mm-ddThh:mm:ssZ") from None
    elif len(words) != 2:
        raise ValueError("expected '<key|serial|key-id> <value> [from <time>]'")
    for kind in _KINDS:
        if words[0] == kind:
            return RevocationEntry(kind, words[1], effective)
    raise ValueError(f"unknown entry type {words[0]!r}; expected key, serial or key-id")


class RevocationSource:
    """The revocation list file, re-read whenever it changes on disk."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._signature: tuple[int, int, int] | None = None
        self._list: RevocationList | None = RevocationList()
        if path is not None:
            self._signature = _file_signature(path)
            self._list = RevocationList.load(path)

    def current(self) -> RevocationList | None:
        """Return the list in force, or None when it cannot be read (refuse everyone)."""
        if self._path is None:
            return self._list
        try:
            signature = _file_signature(self._path)
        except ConfigError as exc:
            logger.error("%s; refusing every agent until it is readable", exc)
            self._signature, self._list = None, None
            return None
        if signature != self._signature:
            self._signature = signature
            try:
                self._list = RevocationList.load(self._path)
                logger.info("revocation list %s re-read", self._path)
            except ConfigError as exc:
                logger.error("%s; refusing every agent until it is fixed", exc)
                self._list = None
        return self._list


def _file_signature(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read revocation list {path}: {exc}") from None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
