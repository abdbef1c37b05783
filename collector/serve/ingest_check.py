"""Proves an incoming backup whole while it streams: byte count, SHA-256, compression
stream decoded to its end, and the dump format's own completeness mark.

SQL dumps must end with the dump tool's `-- Dump completed` trailer, which mariadb-dump
and mysqldump write only after the last table. MongoDB archives are parsed to their
end with every namespace's CRC checked. PostgreSQL archives and plain SQL are checked
by :mod:`common.pg_archive` (TOC and data blocks; completion comment).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from common.compression import StreamChecker
from common.errors import IntegrityError
from common.pg_archive import PgArchiveChecker, PgSqlChecker

SQL_TRAILER = b"-- Dump completed"


class FormatCheck(Protocol):
    """Checks the decompressed stream of one dump format."""

    def feed(self, data: bytes) -> None: ...
    def finish(self, tail: bytes) -> dict[str, Any]: ...


class SqlCheck:
    """A SQL dump is whole when its last lines hold the dump tool's trailer."""

    def feed(self, data: bytes) -> None:
        pass  # the trailer check needs only the tail the StreamChecker keeps

    def finish(self, tail: bytes) -> dict[str, Any]:
        last_lines = tail.rstrip(b"\n").rsplit(b"\n", 3)[-3:]
        if not any(line.startswith(SQL_TRAILER) for line in last_lines):
            raise IntegrityError("SQL dump has no completion trailer: the dump did not finish")
        return {}


def _archive_check() -> FormatCheck:
    # Imported late: only MongoDB backups need the archive parser.
    from common.mongo_archive import ArchiveVerifier

    verifier = ArchiveVerifier()

    class _Check:
        def feed(self, data: bytes) -> None:
            verifier.feed(data)

        def finish(self, tail: bytes) -> dict[str, Any]:
            return dict(verifier.finish())

    return _Check()


class _PgCheck:
    """The PostgreSQL checkers of :mod:`common.pg_archive` in this module's interface."""

    def __init__(self, checker: PgArchiveChecker | PgSqlChecker) -> None:
        self._checker = checker

    def feed(self, data: bytes) -> None:
        self._checker.feed(data)

    def finish(self, tail: bytes) -> dict[str, Any]:
        return self._checker.finish()


FORMAT_CHECKS: dict[str, Callable[[], FormatCheck]] = {
    "sql": SqlCheck,
    "archive": _archive_check,
    "pgdump": lambda: _PgCheck(PgArchiveChecker()),
    "pgsql": lambda: _PgCheck(PgSqlChecker()),
}


class IngestVerifier:
    """Feeds every received chunk through hashing, decompression and the format check."""

    def __init__(self, fmt: str, compression: str, max_ratio: int | None) -> None:
        self._format = FORMAT_CHECKS[fmt]()
        self._checker = StreamChecker(
            compression, sink=self._format.feed, max_ratio=max_ratio
        )
        self._sha = hashlib.sha256()
        self.byte_count = 0

    def feed(self, data: bytes) -> None:
        """Account for one chunk.

        Raises:
            IntegrityError: corrupt or over-expanding stream, or bad format.
        """
        self._sha.update(data)
        self.byte_count += len(data)
        self._checker.feed(data)

    def finish(self, byte_count: int, sha256: str) -> dict[str, Any]:
        """Compare with the agent's END and check completeness; returns format facts.

        Raises:
            IntegrityError: any mismatch or incompleteness, with a one-line reason.
        """
        if byte_count != self.byte_count:
            raise IntegrityError(
                f"byte count mismatch: agent sent {self.byte_count}, END says {byte_count}"
            )
        digest = self._sha.hexdigest()
        if digest != sha256:
            raise IntegrityError(f"SHA-256 mismatch: received {digest}, END says {sha256}")
        self._checker.finish()
        if self._checker.output_bytes == 0:
            raise IntegrityError("backup is empty once decompressed")
        facts = self._format.finish(self._checker.tail)
        return {"uncompressed_bytes": self._checker.output_bytes, **facts}

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
