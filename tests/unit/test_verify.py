"""Tests for ingest verification: byte count, SHA-256, a complete compression stream and
the SQL dump's completion trailer."""

from __future__ import annotations

import hashlib

import pytest

from common.compression import TAIL_BYTES, make_compressor
from common.errors import IntegrityError
from common.integrity import IntegrityChecker as IngestVerifier
from common.integrity import SqlCheck

TRAILER = b"-- Dump completed on 2026-11-26 10:00:00\n"
HEADER = (
    b"-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64)\n"
    b"--\n-- Host: localhost    Database: hospital\n"
    b"-- ------------------------------------------------------\n"
)
BODY = b"".join(
    b"INSERT INTO `patients` VALUES (%d,'name %d','2026-01-01');\n" % (i, i) for i in range(2000)
)
FOOTER = b"/*!40101 SET SQL_MODE=@OLD_SQL_MODE */;\n/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;\n\n"
DUMP = HEADER + BODY + FOOTER + TRAILER


def compress(kind: str, data: bytes) -> bytes:
    compressor = make_compressor(kind)
    return compressor.compress(data) + compressor.flush()


def verify(
    stream: bytes,
    *,
    kind: str = "zstd",
    chunk: int = 65536,
    byte_count: int | None = None,
    sha256: str | None = None,
    max_ratio: int | None = 1000,
) -> dict[str, object]:
    verifier = IngestVerifier("sql", kind, max_ratio)
    for start in range(0, len(stream), chunk):
        verifier.feed(stream[start : start + chunk])
    return verifier.finish(
        len(stream) if byte_count is None else byte_count,
        hashlib.sha256(stream).hexdigest() if sha256 is None else sha256,
    )


# --- accepted ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 1000, 65536])
@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_complete_sql_dump_is_accepted(kind: str, chunk: int) -> None:
    stream = compress(kind, DUMP)
    assert verify(stream, kind=kind, chunk=chunk) == {"uncompressed_bytes": len(DUMP)}


def test_verifier_reports_what_it_received() -> None:
    stream = compress("zstd", DUMP)
    verifier = IngestVerifier("sql", "zstd", None)
    verifier.feed(stream)
    assert verifier.byte_count == len(stream)
    assert verifier.sha256 == hashlib.sha256(stream).hexdigest()


@pytest.mark.parametrize(
    "ending",
    [
        TRAILER,
        TRAILER.rstrip(b"\n"),
        TRAILER + b"\n\n\n",
        b"-- Dump completed\n",
        TRAILER + b"-- one more comment line\n",
    ],
    ids=["newline", "no-newline", "blank-lines", "mysqldump-without-date", "comment-after"],
)
def test_trailer_among_the_last_lines_is_accepted(ending: bytes) -> None:
    verify(compress("zstd", HEADER + BODY + ending))


def test_dump_made_only_of_a_trailer_is_accepted() -> None:
    verify(compress("zstd", TRAILER))


# --- rejected ----------------------------------------------------------------------------


def test_dump_without_trailer_is_rejected() -> None:
    with pytest.raises(IntegrityError, match="trailer"):
        verify(compress("zstd", HEADER + BODY + FOOTER))


def test_dump_cut_in_the_middle_of_a_table_is_rejected() -> None:
    cut = DUMP[: len(DUMP) // 2]
    with pytest.raises(IntegrityError, match="trailer"):
        verify(compress("zstd", cut))


def test_trailer_followed_by_more_sql_is_rejected() -> None:
    with pytest.raises(IntegrityError, match="trailer"):
        verify(compress("zstd", HEADER + TRAILER + BODY))


def test_trailer_text_not_at_the_start_of_a_line_is_rejected() -> None:
    with pytest.raises(IntegrityError, match="trailer"):
        verify(compress("zstd", BODY + b"SELECT '" + TRAILER.rstrip() + b"';\n"))


def test_trailer_only_far_before_the_end_is_rejected() -> None:
    late = b"x" * TAIL_BYTES + b"\n"
    with pytest.raises(IntegrityError, match="trailer"):
        verify(compress("zstd", HEADER + TRAILER + late))


def test_empty_dump_is_rejected() -> None:
    with pytest.raises(IntegrityError, match="empty"):
        verify(compress("zstd", b""))


def test_no_bytes_at_all_is_rejected() -> None:
    with pytest.raises(IntegrityError):
        verify(b"")


@pytest.mark.parametrize("delta", [-1, 1])
def test_byte_count_mismatch_is_rejected(delta: int) -> None:
    stream = compress("zstd", DUMP)
    with pytest.raises(IntegrityError, match="byte count mismatch"):
        verify(stream, byte_count=len(stream) + delta)


def test_sha256_mismatch_is_rejected() -> None:
    stream = compress("zstd", DUMP)
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        verify(stream, sha256=hashlib.sha256(b"something else").hexdigest())


def test_sha256_in_upper_case_is_a_mismatch() -> None:
    stream = compress("zstd", DUMP)
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        verify(stream, sha256=hashlib.sha256(stream).hexdigest().upper())


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_truncated_stream_is_rejected(kind: str) -> None:
    stream = compress(kind, DUMP)[:-3]
    with pytest.raises(IntegrityError, match="truncated"):
        verify(stream, kind=kind)


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_corrupted_stream_is_rejected(kind: str) -> None:
    stream = bytearray(compress(kind, DUMP))
    stream[len(stream) // 2] ^= 0xFF
    with pytest.raises(IntegrityError):
        verify(bytes(stream), kind=kind)


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_trailing_bytes_after_the_stream_are_rejected(kind: str) -> None:
    with pytest.raises(IntegrityError, match="after its end"):
        verify(compress(kind, DUMP) + b"\x00", kind=kind)


def test_stream_in_the_wrong_compression_is_rejected() -> None:
    with pytest.raises(IntegrityError):
        verify(compress("gzip", DUMP), kind="zstd")
    with pytest.raises(IntegrityError):
        verify(compress("zstd", DUMP), kind="gzip")


def test_sql_check_alone_needs_the_trailer_in_the_tail() -> None:
    check = SqlCheck()
    check.feed(b"anything")
    assert check.finish(b"...\n" + TRAILER) == {}
    with pytest.raises(IntegrityError):
        check.finish(b"")
