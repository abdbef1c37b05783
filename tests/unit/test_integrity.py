"""The one integrity checker, byte by byte: the verdict does not depend on how the stored
bytes are cut into chunks, and every caller (ingest, verify, restore) gets the same rules."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import bson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.compression import make_compressor
from common.errors import IntegrityError
from common.integrity import FORMAT_CHECKS, IntegrityChecker
from common.mongo_archive import ArchiveHeader, ArchiveWriter, NamespaceMetadata

SQL = (
    b"-- MariaDB dump 10.19  Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64)\n"
    + b"".join(b"INSERT INTO `t` VALUES (%d,'row %d');\n" % (i, i) for i in range(3000))
    + b"-- Dump completed on 2026-11-26 10:00:00\n"
)


def archive(documents: int = 300) -> bytes:
    writer = ArchiveWriter(block_size=4096)
    return b"".join(
        [
            writer.prelude(
                ArchiveHeader(server_version="7.0.12", tool_version="backhaul-test"),
                [NamespaceMetadata("hospital", "people", "", documents, "collection")],
            ),
            writer.begin_block("hospital", "people"),
            *(writer.document(bson.encode({"_id": i, "name": f"p{i}"})) for i in range(documents)),
            writer.end_namespace("hospital", "people"),
        ]
    )


def compress(kind: str, data: bytes) -> bytes:
    compressor = make_compressor(kind)
    return compressor.compress(data) + compressor.flush()


DUMPS = {"sql": SQL, "archive": archive()}
STREAMS = {
    (fmt, kind): compress(kind, dump) for fmt, dump in DUMPS.items() for kind in ("zstd", "gzip")
}
KINDS = sorted(STREAMS)


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def verdict(fmt: str, kind: str, chunks: list[bytes]) -> Mapping[str, Any] | str:
    """The facts of an accepted backup, or the reason it was rejected (END matching what
    was sent, so that only the content decides)."""
    checker = IntegrityChecker(fmt, kind, 1000)
    data = b"".join(chunks)
    try:
        for chunk in chunks:
            checker.feed(chunk)
        return checker.finish(len(data), hashlib.sha256(data).hexdigest())
    except IntegrityError as exc:
        return str(exc)


# --- accepted, however split -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from(KINDS),
    cuts=st.lists(st.integers(min_value=0, max_value=max(map(len, STREAMS.values()))), max_size=10),
)
def test_whole_backup_is_accepted_however_its_bytes_are_split(
    which: tuple[str, str], cuts: list[int]
) -> None:
    stream = STREAMS[which]
    facts = verdict(*which, pieces(stream, cuts))
    assert facts == verdict(*which, [stream])
    assert isinstance(facts, Mapping) and facts["uncompressed_bytes"] == len(DUMPS[which[0]])


def test_archive_facts_reach_the_caller() -> None:
    """The archive's own summary (namespaces, documents) comes back for the manifest."""
    facts = verdict("archive", "zstd", [STREAMS[("archive", "zstd")]])
    assert isinstance(facts, Mapping)
    assert facts["namespaces"] == 1 and facts["documents"] == 300


# --- rejected, however split -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(KINDS), data=st.data())
def test_backup_cut_anywhere_is_rejected(which: tuple[str, str], data: st.DataObject) -> None:
    stream = STREAMS[which]
    cut = data.draw(st.integers(min_value=0, max_value=len(stream) - 1), label="cut")
    chunk_cuts = data.draw(st.lists(st.integers(0, cut), max_size=5), label="chunks")
    assert isinstance(verdict(*which, pieces(stream[:cut], chunk_cuts)), str)


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(KINDS), data=st.data())
def test_damaged_backup_is_refused_or_passed_the_same_however_split(
    which: tuple[str, str], data: st.DataObject
) -> None:
    """Which problem is met first may move with the cuts (a corrupt block, or the garbage
    it decodes to); whether the backup passes does not, nor what it passes with. Bytes
    that pass are ones the decoder does not need for the dump (gzip's time stamp,
    zstd's window size); the SHA-256 in END or the manifest catches those."""
    stream = bytearray(STREAMS[which])
    at = data.draw(st.integers(min_value=0, max_value=len(stream) - 1), label="at")
    stream[at] ^= data.draw(st.integers(min_value=1, max_value=255), label="xor")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    split, whole = verdict(*which, pieces(bytes(stream), cuts)), verdict(*which, [bytes(stream)])
    assert isinstance(split, str) == isinstance(whole, str)
    if not isinstance(whole, str):
        assert split == whole


def test_damaged_dump_inside_a_sound_stream_is_rejected() -> None:
    """Compression intact but the archive inside damaged: the format check catches it."""
    dump = bytearray(DUMPS["archive"])
    dump[len(dump) // 2] ^= 0x01  # inside a document: its namespace's CRC no longer fits
    assert "CRC mismatch" in str(verdict("archive", "gzip", [compress("gzip", bytes(dump))]))


def test_sql_dump_without_its_trailer_is_rejected() -> None:
    stream = compress("zstd", SQL.rsplit(b"-- Dump completed", 1)[0])
    assert "no completion trailer" in str(verdict("sql", "zstd", [stream]))


def test_sql_trailer_does_not_make_an_archive_whole() -> None:
    """Each format is judged by its own mark: a SQL dump sent as an archive is refused."""
    assert isinstance(verdict("archive", "zstd", [STREAMS[("sql", "zstd")]]), str)


def test_expansion_past_the_ratio_cap_stops_the_feed() -> None:
    """A decompression bomb is refused while it streams, before any END."""
    bomb = compress("zstd", bytes(80 * 1024 * 1024))
    checker = IntegrityChecker("sql", "zstd", 1000)
    with pytest.raises(IntegrityError, match="expands more than 1000:1"):
        checker.feed(bomb)
    assert checker.problem is not None and "1000:1" in checker.problem


def test_ratio_cap_of_none_lets_a_highly_compressible_dump_through() -> None:
    dump = bytes(70 * 1024 * 1024) + b"\n-- Dump completed\n"
    stream = compress("zstd", dump)
    checker = IntegrityChecker("sql", "zstd", None)
    checker.feed(stream)
    facts = checker.finish(len(stream), hashlib.sha256(stream).hexdigest())
    assert facts["uncompressed_bytes"] == len(dump)


# --- END and manifest: what each caller compares -----------------------------------------


def test_finish_names_a_byte_count_mismatch_before_anything_else() -> None:
    stream = STREAMS[("sql", "zstd")][:-5]  # truncated too: the count is reported first
    checker = IntegrityChecker("sql", "zstd", 1000)
    checker.feed(stream)
    with pytest.raises(IntegrityError, match="byte count mismatch: agent sent"):
        checker.finish(len(stream) + 5, hashlib.sha256(stream).hexdigest())


def test_finish_names_a_sha256_mismatch() -> None:
    stream = STREAMS[("sql", "gzip")]
    checker = IntegrityChecker("sql", "gzip", 1000)
    checker.feed(stream)
    with pytest.raises(IntegrityError, match="SHA-256 mismatch: received"):
        checker.finish(len(stream), "0" * 64)


def test_feeding_on_after_a_problem_still_counts_and_hashes() -> None:
    """verify reads a damaged file to its end to report its size and digest too."""
    stream = bytearray(STREAMS[("sql", "zstd")])
    stream[len(stream) // 2] ^= 0xFF
    checker = IntegrityChecker("sql", "zstd", 1000)
    raised = 0
    for chunk in pieces(bytes(stream), range(0, len(stream), 100)):
        try:
            checker.feed(chunk)
        except IntegrityError:
            raised += 1
    assert raised == 1  # the first problem only; later chunks are counted quietly
    assert checker.byte_count == len(stream)
    assert checker.sha256 == hashlib.sha256(stream).hexdigest()
    with pytest.raises(IntegrityError, match="corrupt"):
        checker.finish(len(stream), hashlib.sha256(stream).hexdigest())


def test_audit_lists_size_digest_and_content_problems_together() -> None:
    stream = STREAMS[("sql", "gzip")]
    short = stream[:-10]
    checker = IntegrityChecker("sql", "gzip", 1000)
    checker.feed(short)
    reasons = checker.audit(len(stream), hashlib.sha256(stream).hexdigest())
    assert reasons[0] == f"size is {len(short)} bytes, manifest says {len(stream)}"
    assert reasons[1].startswith(f"SHA-256 is {hashlib.sha256(short).hexdigest()[:16]}...")
    assert "truncated" in reasons[2] and len(reasons) == 3


def test_audit_of_a_whole_backup_is_empty() -> None:
    stream = STREAMS[("archive", "zstd")]
    checker = IntegrityChecker("archive", "zstd", 1000)
    checker.feed(stream)
    assert checker.audit(len(stream), hashlib.sha256(stream).hexdigest()) == []


@pytest.mark.parametrize("size", [None, "123", True])
def test_audit_names_a_manifest_without_size_or_digest(size: object) -> None:
    checker = IntegrityChecker("sql", "zstd", 1000)
    checker.feed(STREAMS[("sql", "zstd")])
    assert checker.audit(size, None) == ["manifest has no size", "manifest has no SHA-256"]


def test_refusing_checker_reports_its_problem_with_size_and_digest() -> None:
    stream = STREAMS[("sql", "zstd")]
    checker = IntegrityChecker.refusing("manifest names an unknown format 'x'")
    checker.feed(stream)
    assert checker.byte_count == len(stream)
    assert checker.audit(len(stream) + 1, hashlib.sha256(stream).hexdigest()) == [
        f"size is {len(stream)} bytes, manifest says {len(stream) + 1}",
        "manifest names an unknown format 'x'",
    ]


# --- restore's sink and the format registry ----------------------------------------------


@pytest.mark.parametrize("which", KINDS)
def test_sink_receives_the_dump_in_order(which: tuple[str, str]) -> None:
    out = bytearray()
    checker = IntegrityChecker(*which, 1000, sink=out.extend)
    for chunk in pieces(STREAMS[which], range(0, len(STREAMS[which]), 777)):
        checker.feed(chunk)
    checker.finish_content()
    assert bytes(out) == DUMPS[which[0]]


def test_unknown_format_or_compression_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        IntegrityChecker("csv", "zstd", 1000)
    with pytest.raises(ValueError, match="unknown compression 'xz'"):
        IntegrityChecker("sql", "xz", 1000)


class _EndsWithOk:
    """A stand-in dump format whose completeness mark is a last line of ``OK``."""

    def __init__(self) -> None:
        self.seen = 0

    def feed(self, data: bytes) -> None:
        self.seen += len(data)

    def finish(self, tail: bytes) -> dict[str, Any]:
        if not tail.endswith(b"\nOK\n"):
            raise IntegrityError("no OK at the end")
        return {"seen": self.seen}


def test_a_new_format_plugs_in_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry in FORMAT_CHECKS is all a new dump format needs."""
    monkeypatch.setitem(FORMAT_CHECKS, "okfile", _EndsWithOk)
    good, bad = b"data\n" * 1000 + b"OK\n", b"data\n" * 1000
    assert verdict("okfile", "zstd", [compress("zstd", good)]) == {
        "uncompressed_bytes": len(good),
        "seen": len(good),
    }
    assert verdict("okfile", "gzip", [compress("gzip", bad)]) == "no OK at the end"


def test_a_problem_raised_once_is_raised_again_by_finish() -> None:
    """Ingest and restore stop at the first problem; a later finish still refuses."""
    checker = IntegrityChecker("sql", "gzip", 1000)
    with contextlib.suppress(IntegrityError):
        checker.feed(b"not gzip at all")
    with pytest.raises(IntegrityError, match="gzip stream is corrupt"):
        checker.finish_content()
