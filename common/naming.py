"""Backup names: `<db>_<yyyymmdd>[-N].<ext>`, the safe file-name encoding of database
names, and the parser that reads a stored name back.

Database names are untrusted. MySQL and MongoDB accept names such as `a/b`, `..`,
`.hidden`, `sp ace` or `ünï`; they are stored under a reversible encoding that keeps
ASCII letters, digits, `_` and `-` and writes every other byte of the UTF-8 name as
`%XX`. The result never contains `/` or `.`, never starts with `.` or `-`, and so can
neither leave its folder, hide, nor be mistaken for the date or the extension. Unicode
look-alikes (a Cyrillic letter o in a name that looks like `hospital`) stay visibly
different on disk.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date

from common.errors import RejectCode, RemoteProtocolError

MAX_DB_NAME_CHARS = 64  # MySQL's and MongoDB's limit
MAX_ENCODED_NAME = 200  # leaves room for `_yyyymmdd-NNNN.archive.gz` + manifest suffix
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

EXTENSIONS: dict[tuple[str, str], str] = {
    ("sql", "zstd"): "sql.zst",
    ("sql", "gzip"): "sql.gz",
    ("archive", "gzip"): "archive.gz",
    ("archive", "zstd"): "archive.zst",
    ("pgdump", "zstd"): "pgdump.zst",  # pg_dump custom format (pg_restore reads it)
    ("pgdump", "gzip"): "pgdump.gz",
    ("pgsql", "zstd"): "pgsql.zst",  # PostgreSQL plain SQL: the globals (psql reads it)
    ("pgsql", "gzip"): "pgsql.gz",
}
MANIFEST_SUFFIX = ".manifest.json"
TEMP_PREFIX = ".tmp-"

_NAME_RE = re.compile(
    r"\A(?P<db>[A-Za-z0-9_%][A-Za-z0-9_%-]*)_(?P<date>[0-9]{8})(?:-(?P<seq>[2-9]|[1-9][0-9]{1,3}))?"
    r"\.(?P<ext>[a-z]+\.[a-z]+)\Z"
)


def check_database_name(name: str) -> None:
    """Refuse names that no database server allows or that cannot be stored safely.

    Raises:
        RemoteProtocolError: with reject code ``bad_name``.
    """
    problem = _name_problem(name)
    if problem:
        raise RemoteProtocolError(f"database name refused: {problem}", RejectCode.BAD_NAME)


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty"
    if len(name) > MAX_DB_NAME_CHARS:
        return f"longer than {MAX_DB_NAME_CHARS} characters"
    for char in name:
        if char == "\x00":
            return "contains NUL"
        if unicodedata.category(char) in ("Cc", "Cs", "Co", "Cn"):
            return f"contains control or unassigned character U+{ord(char):04X}"
        if ord(char) > 0xFFFF:
            return "contains a character outside the Basic Multilingual Plane"
    if name != name.rstrip():
        return "ends with white space"
    if len(encode_database(name)) > MAX_ENCODED_NAME:
        return "too long once encoded for the file system"
    return None


def encode_database(name: str) -> str:
    """Return the file-name form of a database name (reversible, see module doc).

    Raises:
        UnicodeEncodeError: ``name`` holds a lone surrogate, which JSON can carry but
            no server allows; ``check_database_name`` refuses such names first.
    """
    out: list[str] = []
    for index, char in enumerate(name):
        if char in _SAFE and not (index == 0 and char == "-"):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def decode_database(encoded: str) -> str:
    """Invert ``encode_database``.

    Raises:
        ValueError: not a valid encoding.
    """
    raw = bytearray()
    index = 0
    while index < len(encoded):
        char = encoded[index]
        if char == "%":
            hex_digits = encoded[index + 1 : index + 3]
            if len(hex_digits) != 2 or not all(c in "0123456789ABCDEF" for c in hex_digits):
                raise ValueError(f"bad escape in {encoded!r}")
            raw.append(int(hex_digits, 16))
            index += 3
        elif char in _SAFE:
            raw += char.encode()
            index += 1
        else:
            raise ValueError(f"unexpected character in {encoded!r}")
    name = raw.decode("utf-8")
    if encode_database(name) != encoded:
        raise ValueError(f"{encoded!r} is not the canonical encoding of {name!r}")
    return name


def extension_for(fmt: str, compression: str) -> str:
    """File extension for a dump format and compression.

    Raises:
        RemoteProtocolError: an unknown combination.
    """
    try:
        return EXTENSIONS[(fmt, compression)]
    except KeyError:
        raise RemoteProtocolError(
            f"unsupported format/compression {fmt!r}/{compression!r}"
        ) from None


def backup_name(database: str, day: date, seq: int, ext: str) -> str:
    """`<encoded db>_<yyyymmdd>[-seq].<ext>`; seq 1 has no suffix."""
    suffix = "" if seq == 1 else f"-{seq}"
    # Not %Y: strftime does not pad years before 1000, which would not parse back.
    stamp = f"{day.year:04d}{day.month:02d}{day.day:02d}"
    return f"{encode_database(database)}_{stamp}{suffix}.{ext}"


@dataclass(frozen=True)
class ParsedName:
    """What a stored backup's file name says."""

    database: str
    day: date
    seq: int
    ext: str


def parse_backup_name(file_name: str) -> ParsedName | None:
    """Read a stored name back; None for anything that is not a backup's name."""
    match = _NAME_RE.match(file_name)
    if match is None or match["ext"] not in EXTENSIONS.values():
        return None
    try:
        database = decode_database(match["db"])
        day = date(int(match["date"][:4]), int(match["date"][4:6]), int(match["date"][6:]))
    except ValueError:
        return None
    return ParsedName(database, day, int(match["seq"] or 1), match["ext"])
