"""Completeness of PostgreSQL dumps, sans-io: the custom-format archive and plain SQL.

A custom-format archive (``pg_dump -Fc``) written to a pipe is a header, a table of
contents (TOC) and then one data block per TOC entry that has data, in TOC order::

    "PGDMP" vmaj vmin vrev intSize offSize format  compression  timestamp
    dbname server_version pg_dump_version
    tocCount, then per entry: dumpId hadDumper tableoid oid tag desc section defn
        dropStmt copyStmt namespace tablespace [tableam >=1.14] [relkind >=1.16]
        owner "false" deps... NULL  offsetFlag offset
    per data entry: BLK_DATA dumpId (len bytes)* 0
    per large-object entry: BLK_BLOBS dumpId (oid (len bytes)* 0)* 0

An int is a sign byte and ``intSize`` little-endian bytes; a string is an int length
(-1 for NULL) and its bytes. The archive has no end marker: it is whole when every entry
the TOC says has data has its block, each ended by its zero-length chunk, and nothing
follows. :class:`PgArchiveChecker` proves exactly that as the bytes stream past, holding
no more than one TOC string or one chunk header at a time, so a dump cut at any byte is
refused. :class:`PgSqlChecker` does the same for plain SQL (``pg_dumpall
--globals-only``), which is whole when it ends with the tool's completion comment.

Both raise :class:`~common.errors.IntegrityError`, as the other format checks do.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Any

from common.errors import IntegrityError

MAGIC = b"PGDMP"
ARCH_CUSTOM = 1
BLK_DATA = 1
BLK_BLOBS = 3
OFFSET_NO_DATA = 3
OFFSET_FLAGS = frozenset({1, 2, 3})  # not set (written to a pipe), set, no data
# Archive versions this checker reads: 1.14 (pg_dump 12-15), 1.15 (16: compression
# algorithm byte), 1.16 (17-18: relkind in the TOC). A newer one is refused, not guessed.
OLDEST = (1, 14)
NEWEST = (1, 16)
MAX_STRING = 256 * 1024 * 1024  # a TOC string: a view's or function's definition
MAX_CHUNK = 1024 * 1024 * 1024
MAX_ENTRIES = 10_000_000
# The last bytes the tools write, once the last object is out.
SQL_ENDINGS = (
    b"\n--\n-- PostgreSQL database cluster dump complete\n--\n\n",  # pg_dumpall
    b"\n--\n-- PostgreSQL database dump complete\n--\n\n",  # pg_dump -Fp
)
_TAIL = 256

_Wait = Generator[None, None, Any]


class PgArchiveChecker:
    """Streams a custom-format archive through :meth:`feed`; :meth:`finish` judges it.

    Raises (both methods):
        IntegrityError: not an archive, an unsupported version, a malformed TOC or
            block, a block for an entry the TOC does not list or lists without data, or
            (at :meth:`finish`) an archive cut before its last block ended.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._int_size = 4
        self._int_struct = struct.Struct("<BI")
        self.version: tuple[int, int, int] | None = None
        self.entries = 0
        self.expected: set[int] = set()
        self.seen: set[int] = set()
        self.large_objects = 0
        self.tables = 0  # TOC entries of tables (partitions included), for restore drills
        self.facts: dict[str, Any] = {}
        self._where = "the archive header"
        self._between_blocks = False
        self._parser = self._parse()
        next(self._parser)

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the archive."""
        if not data:
            return
        self._buf += data
        try:
            next(self._parser)
        except StopIteration:  # pragma: no cover - the parser waits for more forever
            raise IntegrityError("PostgreSQL archive parser ended early") from None
        del self._buf[: self._pos]
        self._pos = 0

    def finish(self) -> dict[str, Any]:
        """The archive has ended: check it is whole; returns facts for the manifest."""
        if not self._between_blocks or self._buf:
            raise IntegrityError(
                f"PostgreSQL archive cut inside {self._where}: the dump did not finish"
            )
        missing = self.expected - self.seen
        if missing:
            shown = ", ".join(str(i) for i in sorted(missing)[:5])
            raise IntegrityError(
                f"PostgreSQL archive lacks the data of {len(missing)} TOC entr"
                f"{'y' if len(missing) == 1 else 'ies'} ({shown}): the dump did not finish"
            )
        return {"pg_archive": {**self.facts, "toc_entries": self.entries,
                               "data_entries": len(self.expected), "tables": self.tables,
                               "large_objects": self.large_objects}}

    # -- primitives: each waits (yields) until its bytes are buffered ----------------------

    def _take(self, count: int) -> _Wait:
        while len(self._buf) - self._pos < count:
            yield
        start = self._pos
        self._pos += count
        return bytes(self._buf[start : self._pos])

    def _int(self) -> _Wait:
        raw = yield from self._take(1 + self._int_size)
        return _decode_int(raw)

    def _str(self) -> _Wait:
        length = yield from self._int()
        if length == -1:
            return None
        if not 0 <= length <= MAX_STRING:
            raise IntegrityError(f"PostgreSQL archive: bad string length {length} in {self._where}")
        raw = yield from self._take(length)
        return raw

    # -- the grammar -----------------------------------------------------------------------

    def _parse(self) -> _Wait:
        yield
        yield from self._header()
        count = yield from self._int()
        if not 0 <= count <= MAX_ENTRIES:
            raise IntegrityError(f"PostgreSQL archive: bad TOC entry count {count}")
        for index in range(count):
            self._where = f"TOC entry {index + 1} of {count}"
            yield from self._toc_entry()
            self.entries += 1
        while True:
            self._where = "the data blocks"
            self._between_blocks = True
            kind = (yield from self._take(1))[0]
            self._between_blocks = False
            dump_id = yield from self._int()
            if kind not in (BLK_DATA, BLK_BLOBS):
                raise IntegrityError(f"PostgreSQL archive: unknown block type {kind}")
            if dump_id not in self.expected or dump_id in self.seen:
                raise IntegrityError(
                    f"PostgreSQL archive: unexpected data block for entry {dump_id}"
                )
            self._where = f"the data of TOC entry {dump_id}"
            if kind == BLK_DATA:
                yield from self._chunks()
            else:
                yield from self._large_objects()
            self.seen.add(dump_id)

    def _header(self) -> _Wait:
        magic = yield from self._take(len(MAGIC))
        if magic != MAGIC:
            raise IntegrityError("not a PostgreSQL custom-format archive (no PGDMP header)")
        vmaj, vmin, vrev, int_size, off_size, fmt = yield from self._take(6)
        self.version = (vmaj, vmin, vrev)
        if not OLDEST <= (vmaj, vmin) <= NEWEST:
            raise IntegrityError(
                f"PostgreSQL archive version {vmaj}.{vmin} is not one this checker reads "
                f"({OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]})"
            )
        if int_size not in (4, 8) or off_size not in (4, 8) or fmt != ARCH_CUSTOM:
            raise IntegrityError(
                f"PostgreSQL archive header is not custom format (int {int_size}, "
                f"offset {off_size}, format {fmt})"
            )
        self._int_size = int_size
        self._off_size = off_size
        self._int_struct = struct.Struct("<BI" if int_size == 4 else "<BQ")
        if (vmaj, vmin) >= (1, 15):
            yield from self._take(1)  # compression algorithm
        else:
            yield from self._int()  # compression level
        for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
            yield from self._int()
        names = []
        for _ in range(3):
            raw = yield from self._str()
            names.append(None if raw is None else raw.decode("utf-8", errors="replace"))
        self.facts = {"archive_version": f"{vmaj}.{vmin}.{vrev}",
                      "server_version": names[1], "pg_dump_version": names[2]}

    def _toc_entry(self) -> _Wait:
        dump_id = yield from self._int()
        had_dumper = yield from self._int()
        if dump_id <= 0:
            raise IntegrityError(f"PostgreSQL archive: TOC entry id {dump_id} out of range")
        assert self.version is not None
        # tableoid, oid, tag, desc; section; defn, drop, copy, namespace, tablespace
        for _ in range(3):
            yield from self._str()
        if (yield from self._str()) == b"TABLE":
            self.tables += 1
        yield from self._int()
        strings = 5 + (1 if self.version[:2] >= (1, 14) else 0)
        for _ in range(strings):
            yield from self._str()
        if self.version[:2] >= (1, 16):
            yield from self._int()  # relkind
        yield from self._str()  # owner
        yield from self._str()  # the old "with OIDs" flag
        while (yield from self._str()) is not None:  # dependencies, NULL-terminated
            pass
        flag = (yield from self._take(1 + self._off_size))[0]
        if flag not in OFFSET_FLAGS:
            raise IntegrityError(f"PostgreSQL archive: bad data offset flag {flag}")
        if had_dumper and flag != OFFSET_NO_DATA:
            self.expected.add(dump_id)

    def _chunks(self) -> _Wait:
        """Length-prefixed chunks up to the zero length; data bytes are skipped, not kept."""
        width = 1 + self._int_size
        unpack = self._int_struct.unpack_from
        while True:
            # The hot loop: pg_dump writes one chunk per table row (4 million per GB of
            # dump), so it walks the buffer directly, with one test per ordinary chunk
            # and the buffer's end found by struct's own bounds check (a third less CPU
            # than comparing positions); the zero length that ends the block, a bad
            # length and a chunk running past the buffer are sorted out after it.
            buf, pos = self._buf, self._pos
            negative = length = 0
            try:
                while True:
                    negative, length = unpack(buf, pos)
                    if negative or not length:
                        break
                    pos += width + length
            except struct.error:  # fewer than ``width`` bytes left at ``pos``
                pass
            else:
                self._pos = pos
                if negative:
                    length = -length
                if length == 0:
                    self._pos = pos + width
                    return
                raise self._bad_chunk(length)
            if pos <= len(buf):  # the buffer ends at or inside a chunk header
                self._pos = pos
                yield
                continue
            # The last chunk runs past the buffer: skip the rest of it as it arrives.
            if length > MAX_CHUNK:
                raise self._bad_chunk(length)
            self._pos = pos - length
            yield from self._skip(length)

    def _bad_chunk(self, length: int) -> IntegrityError:
        return IntegrityError(f"PostgreSQL archive: bad chunk length {length} in {self._where}")

    def _skip(self, count: int) -> _Wait:
        while True:
            room = len(self._buf) - self._pos
            step = min(room, count)
            self._pos += step
            count -= step
            if not count:
                return None
            yield

    def _large_objects(self) -> _Wait:
        while True:
            oid = yield from self._int()
            if oid == 0:
                return
            self.large_objects += 1
            yield from self._chunks()


def _decode_int(raw: bytes | bytearray) -> int:
    value = int.from_bytes(raw[1:], "little")
    return -value if raw[0] else value


class PgSqlChecker:
    """A plain SQL dump from ``pg_dump``/``pg_dumpall``: whole when it ends with the
    tool's completion comment, byte for byte (written only after the last object)."""

    def __init__(self) -> None:
        self._tail = b""
        self.size = 0

    def feed(self, data: bytes) -> None:
        self._tail = (self._tail + data)[-_TAIL:]
        self.size += len(data)

    def finish(self) -> dict[str, Any]:
        """Raises:
            IntegrityError: the dump does not end with the completion comment.
        """
        if not self._tail.endswith(SQL_ENDINGS):
            raise IntegrityError(
                "PostgreSQL SQL dump has no completion comment: the dump did not finish"
            )
        return {}
