"""Whether a backup is whole: the one check that ingest, `verify` and restore all run.

A backup is whole when its byte count and SHA-256 are the ones its sender (END) or its
manifest records, its compression stream decodes to its end without expanding past the
ratio cap, it is not empty once decompressed, and the dump inside carries its format's
own completeness mark. Sans-io: :meth:`IntegrityChecker.feed` takes the stored
(compressed) bytes as they come, :meth:`IntegrityChecker.finish` decides.

The completeness marks, by the format name BEGIN and the manifest carry:

- ``sql``: the dump tool's ``-- Dump completed`` trailer among the last lines, which
  mariadb-dump and mysqldump write only after the last table;
- ``archive``: a MongoDB archive parsed to its end, every namespace's CRC checked.

A new dump format plugs in by adding its check to :data:`FORMAT_CHECKS`: any object with
``feed(data)`` and ``finish(tail)`` (see :class:`FormatCheck`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from common.compression import StreamChecker
from common.errors import IntegrityError

SQL_TRAILER = b"-- Dump completed"
DEFAULT_MAX_RATIO = 100_000  # decompressed:compressed; the collector's default max_expansion


class FormatCheck(Protocol):
    """Checks the decompressed stream of one dump format."""

    def feed(self, data: bytes) -> None:
        """Take the next decompressed piece.

        Raises:
            IntegrityError: the stream is not of this format, or is damaged.
        """

    def finish(self, tail: bytes) -> Mapping[str, Any]:
        """Decide once the stream has ended; ``tail`` holds its last decompressed bytes
        (:data:`common.compression.TAIL_BYTES` of them). Returns facts for the manifest.

        Raises:
            IntegrityError: the dump is incomplete.
        """


class SqlCheck:
    """A SQL dump is whole when its last lines hold the dump tool's trailer."""

    def feed(self, data: bytes) -> None:
        pass  # the trailer check needs only the tail the StreamChecker keeps

    def finish(self, tail: bytes) -> dict[str, Any]:
        last_lines = tail.rstrip(b"\n").rsplit(b"\n", 3)[-3:]
        if not any(line.startswith(SQL_TRAILER) for line in last_lines):
            raise IntegrityError("SQL dump has no completion trailer: the dump did not finish")
        return {}


class _ArchiveCheck:
    """A MongoDB archive is whole when parsed to its end with every CRC right."""

    def __init__(self) -> None:
        # Imported late: only MongoDB backups need the archive parser.
        from common.mongo_archive import ArchiveVerifier

        self._verifier = ArchiveVerifier()

    def feed(self, data: bytes) -> None:
        self._verifier.feed(data)

    def finish(self, tail: bytes) -> dict[str, Any]:
        return self._verifier.finish()


# The one place that knows which completeness check each dump format gets.
class _PgCheck:
    """A PostgreSQL custom-format archive (TOC and every data block) or plain SQL dump
    (completion comment), checked by :mod:`common.pg_archive`."""

    def __init__(self, plain: bool) -> None:
        # Imported late: only PostgreSQL backups need the archive parser.
        from common.pg_archive import PgArchiveChecker, PgSqlChecker

        self._checker = PgSqlChecker() if plain else PgArchiveChecker()

    def feed(self, data: bytes) -> None:
        self._checker.feed(data)

    def finish(self, tail: bytes) -> Mapping[str, Any]:
        return self._checker.finish()


FORMAT_CHECKS: dict[str, Callable[[], FormatCheck]] = {
    "sql": SqlCheck,
    "archive": _ArchiveCheck,
    "pgdump": lambda: _PgCheck(plain=False),
    "pgsql": lambda: _PgCheck(plain=True),
}


class IntegrityChecker:
    """Hashes, counts and decompresses a backup's bytes and runs its format's check.

    The first problem found in the content (corrupt or over-expanding stream, a damaged
    dump) is raised by the :meth:`feed` that meets it and kept in :attr:`problem`; later
    feeds only count and hash, so a caller that reads on (verify) can still report size
    and SHA-256. ``sink``, when given, receives every decompressed piece after the
    format check has seen it (restore loads them). ``max_ratio`` caps the expansion
    (decompressed:compressed); None lifts the cap.

    Raises:
        ValueError: no check is known for ``fmt``, or ``compression`` is unknown.
    """

    def __init__(
        self,
        fmt: str,
        compression: str,
        max_ratio: int | None,
        *,
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        make_format = FORMAT_CHECKS.get(fmt)
        if make_format is None:
            raise ValueError(f"unknown format {fmt!r}")
        self._format = make_format()
        # Without a sink the format check takes the pieces directly: one call less per
        # piece on ingest, which runs in the collector's event loop.
        take = self._format.feed if sink is None else _both(self._format.feed, sink)
        self._stream = StreamChecker(compression, sink=take, max_ratio=max_ratio)
        self._sha = hashlib.sha256()
        self.byte_count = 0
        self.problem: str | None = None

    @classmethod
    def refusing(cls, problem: str) -> IntegrityChecker:
        """A checker for content already known to be unreadable (a manifest naming a
        format or compression that nothing checks): it counts and hashes only, and
        reports ``problem``."""
        checker = cls("sql", "zstd", None)  # any real pair: feed stops before decoding
        checker.problem = problem
        return checker

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes fed so far."""
        return self._sha.hexdigest()

    def feed(self, data: bytes) -> None:
        """Account for the next chunk of stored bytes.

        Raises:
            IntegrityError: corrupt or over-expanding stream, or a damaged dump (only the
                first time a problem is met).
        """
        self._sha.update(data)
        self.byte_count += len(data)
        if self.problem is not None:
            return
        try:
            self._stream.feed(data)
        except IntegrityError as exc:
            self.problem = str(exc)
            raise

    def finish(self, byte_count: int, sha256: str) -> dict[str, Any]:
        """Compare with the sender's END and check completeness; returns format facts,
        ``uncompressed_bytes`` among them.

        Raises:
            IntegrityError: any mismatch or incompleteness, with a one-line reason.
        """
        if byte_count != self.byte_count:
            raise IntegrityError(
                f"byte count mismatch: agent sent {self.byte_count}, END says {byte_count}"
            )
        digest = self.sha256
        if digest != sha256:
            raise IntegrityError(f"SHA-256 mismatch: received {digest}, END says {sha256}")
        return self.finish_content()

    def finish_content(self) -> dict[str, Any]:
        """Check the content alone: stream ended, not empty, the format's mark present.

        Raises:
            IntegrityError: the first problem in the content.
        """
        if self.problem is not None:
            raise IntegrityError(self.problem)
        try:
            self._stream.finish()
            if self._stream.output_bytes == 0:
                raise IntegrityError("backup is empty once decompressed")
            facts = self._format.finish(self._stream.tail)
        except IntegrityError as exc:
            self.problem = str(exc)
            raise
        return {"uncompressed_bytes": self._stream.output_bytes, **facts}

    def audit(self, size: object, sha256: object) -> list[str]:
        """Every way the bytes fed differ from what a stored manifest records, then the
        content's first problem; empty when the backup is whole. For ``verify``, which
        reports all of them rather than stopping at the first."""
        reasons: list[str] = []
        if not isinstance(size, int) or isinstance(size, bool):
            reasons.append("manifest has no size")
        elif self.byte_count != size:
            reasons.append(f"size is {self.byte_count} bytes, manifest says {size}")
        digest = self.sha256
        if not isinstance(sha256, str):
            reasons.append("manifest has no SHA-256")
        elif digest != sha256:
            reasons.append(f"SHA-256 is {digest[:16]}..., manifest says {sha256[:16]}...")
        try:
            self.finish_content()
        except IntegrityError as exc:
            reasons.append(str(exc))
        return reasons


def _both(first: Callable[[bytes], None], then: Callable[[bytes], None]) -> Callable[[bytes], None]:
    # A closure, not a method: the checker is not referenced back, so no cycle keeps it
    # (and its decompressor) alive once the caller lets go of it.
    def take(piece: bytes) -> None:
        first(piece)
        then(piece)

    return take
