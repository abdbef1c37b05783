"""Tests for streaming compression and the decompression checker: round trips,
truncation, corruption, trailing bytes, output caps, decompression bombs, the tail."""

from __future__ import annotations

import random
import resource
import time
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
import zstandard

from common.compression import (
    KINDS,
    RATIO_GRACE,
    TAIL_BYTES,
    Compressor,
    StreamChecker,
    make_compressor,
)
from common.errors import IntegrityError

MiB = 1024 * 1024
GiB = 1024 * MiB


def sample_text(size: int, seed: int = 7) -> bytes:
    """SQL-looking text that compresses, but not to nothing."""
    rnd = random.Random(seed)
    words = [b"INSERT", b"INTO", b"`patients`", b"VALUES", b"(1,'x')", b"NULL", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" " + str(rnd.randrange(10**6)).encode()
    return bytes(out[:size])


def compress(kind: str, data: bytes, chunk: int = 65536, **options: int) -> bytes:
    compressor = make_compressor(kind, **options)
    parts = [compressor.compress(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    parts.append(compressor.flush())
    return b"".join(parts)


def check(kind: str, stream: bytes, chunk: int | None = None, **options: int) -> bytes:
    """Feed ``stream`` to a checker, finish it, and return what it decompressed to."""
    out = bytearray()
    checker = StreamChecker(kind, sink=out.extend, **options)
    step = chunk or max(len(stream), 1)
    for start in range(0, len(stream), step):
        checker.feed(stream[start : start + step])
    checker.finish()
    return bytes(out)


TEXT = sample_text(200_000)
SMALL = sample_text(3000, seed=3)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7, 1024, 1025, 65536])
@pytest.mark.parametrize("kind", KINDS)
def test_compressed_stream_round_trips_through_the_checker(kind: str, chunk: int | None) -> None:
    data = SMALL if chunk == 1 else TEXT
    assert check(kind, compress(kind, data), chunk) == data


@pytest.mark.parametrize("kind", KINDS)
def test_checker_counts_input_and_output_bytes(kind: str) -> None:
    stream = compress(kind, TEXT)
    checker = StreamChecker(kind)
    checker.feed(stream)
    checker.finish()
    assert checker.input_bytes == len(stream)
    assert checker.output_bytes == len(TEXT)


@pytest.mark.parametrize("kind", KINDS)
def test_random_bytes_round_trip(kind: str) -> None:
    data = random.Random(11).randbytes(300_000)
    assert check(kind, compress(kind, data), 4096) == data


@pytest.mark.parametrize("kind", KINDS)
def test_empty_input_compresses_to_a_complete_empty_stream(kind: str) -> None:
    checker = StreamChecker(kind)
    checker.feed(compress(kind, b""))
    checker.finish()
    assert checker.output_bytes == 0
    assert checker.tail == b""


@pytest.mark.parametrize(("kind", "level"), [("zstd", 1), ("zstd", 19), ("gzip", 1), ("gzip", 9)])
def test_explicit_levels_round_trip(kind: str, level: int) -> None:
    assert check(kind, compress(kind, TEXT, level=level)) == TEXT


def test_threaded_zstd_makes_one_checkable_stream() -> None:
    data = sample_text(3 * MiB)
    assert check("zstd", compress("zstd", data, chunk=MiB, threads=2), 65536) == data


def test_zstd_stream_is_readable_by_the_zstd_library() -> None:
    stream = compress("zstd", TEXT)
    reader = zstandard.ZstdDecompressor().decompressobj()
    assert reader.decompress(stream) == TEXT


def test_gzip_stream_is_a_gzip_container() -> None:
    stream = compress("gzip", TEXT)
    assert stream[:2] == b"\x1f\x8b"
    assert zlib.decompress(stream, 31) == TEXT


@pytest.mark.parametrize("kind", ["bz2", "xz", "", "ZSTD"])
def test_unknown_compression_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        make_compressor(kind)
    with pytest.raises(ValueError, match="unknown compression"):
        StreamChecker(kind)


# --- broken streams ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_no_bytes_at_all_is_a_truncated_stream(kind: str) -> None:
    checker = StreamChecker(kind)
    with pytest.raises(IntegrityError, match="truncated"):
        checker.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_stream_truncated_at_any_offset_fails_at_finish(kind: str) -> None:
    stream = compress(kind, SMALL)
    for cut in range(len(stream)):
        checker = StreamChecker(kind)
        checker.feed(stream[:cut])
        with pytest.raises(IntegrityError, match="truncated"):
            checker.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_checksum_byte_is_an_integrity_error(kind: str) -> None:
    stream = bytearray(compress(kind, TEXT))
    stream[-1] ^= 0xFF
    with pytest.raises(IntegrityError):
        check(kind, bytes(stream))


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_body_byte_is_an_integrity_error(kind: str) -> None:
    stream = bytearray(compress(kind, TEXT))
    stream[len(stream) // 2] ^= 0x55
    with pytest.raises(IntegrityError):
        check(kind, bytes(stream), 4096)


@pytest.mark.parametrize("kind", KINDS)
def test_any_flipped_bit_is_caught_or_harmless(kind: str) -> None:
    """A flip either fails the check or leaves the decompressed bytes exactly as they were
    (a header field such as the gzip mtime, or an encoding choice that does not matter)."""
    stream = compress(kind, SMALL)
    caught = 0
    for index in range(len(stream)):
        for bit in (0x01, 0x80):
            broken = bytearray(stream)
            broken[index] ^= bit
            try:
                out = check(kind, bytes(broken))
            except IntegrityError:
                caught += 1
            else:
                assert out == SMALL, f"flip {bit:#x} at {index} changed the output silently"
    assert caught > len(stream)


@pytest.mark.parametrize("garbage", [b"\x00", b"x", b"garbage" * 500], ids=["nul", "one", "long"])
@pytest.mark.parametrize("kind", KINDS)
def test_trailing_garbage_in_the_same_chunk_is_an_integrity_error(
    kind: str, garbage: bytes
) -> None:
    checker = StreamChecker(kind)
    with pytest.raises(IntegrityError, match="after its end"):
        checker.feed(compress(kind, TEXT) + garbage)


@pytest.mark.parametrize("kind", KINDS)
def test_trailing_garbage_in_a_later_chunk_is_an_integrity_error(kind: str) -> None:
    checker = StreamChecker(kind)
    checker.feed(compress(kind, TEXT))
    with pytest.raises(IntegrityError, match="after its end"):
        checker.feed(b"x")


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_concatenated_stream_is_an_integrity_error(kind: str) -> None:
    stream = compress(kind, SMALL)
    with pytest.raises(IntegrityError, match="after its end"):
        check(kind, stream + stream, 1000)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_feed_after_the_end_is_harmless(kind: str) -> None:
    checker = StreamChecker(kind)
    checker.feed(compress(kind, SMALL))
    checker.feed(b"")
    checker.finish()


@pytest.mark.parametrize("kind", KINDS)
def test_uncompressed_input_is_an_integrity_error(kind: str) -> None:
    with pytest.raises(IntegrityError, match="corrupt"):
        check(kind, b"-- MariaDB dump 10.19\nCREATE TABLE t (id int);\n")


@pytest.mark.parametrize("kind", KINDS)
def test_output_over_max_output_is_an_integrity_error(kind: str) -> None:
    checker = StreamChecker(kind, max_output=len(TEXT) - 1)
    with pytest.raises(IntegrityError, match="beyond the limit"):
        checker.feed(compress(kind, TEXT))


@pytest.mark.parametrize("kind", KINDS)
def test_output_exactly_at_max_output_is_accepted(kind: str) -> None:
    assert check(kind, compress(kind, TEXT), max_output=len(TEXT)) == TEXT


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_sink_stops_the_check(kind: str) -> None:
    def sink(_: bytes) -> None:
        raise IntegrityError("format check failed")

    checker = StreamChecker(kind, sink=sink)
    with pytest.raises(IntegrityError, match="format check failed"):
        checker.feed(compress(kind, SMALL))


# --- decompression bombs -----------------------------------------------------------------


def zero_bomb(kind: str, size: int) -> bytes:
    """``size`` zero bytes compressed, made a mebibyte at a time."""
    zeros = bytes(MiB)
    compressor: Compressor
    if kind == "zstd":
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
    else:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(zeros) for _ in range(size // MiB)]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    return zero_bomb("zstd", 2 * GiB)


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def test_zstd_bomb_is_stopped_early_with_bounded_memory(zstd_bomb: bytes) -> None:
    """2 GiB of zeros in ~64 KiB: refused after a small part is expanded, without
    ever holding more than a few tens of MiB."""
    assert len(zstd_bomb) < MiB
    checker = StreamChecker("zstd", max_ratio=1000)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="decompression bomb"):
            for chunk in chunks(zstd_bomb, 65536):
                checker.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert elapsed < 5
    assert checker.output_bytes < 256 * MiB
    assert peak < 128 * MiB
    assert rss_growth_kib < 256 * 1024


def test_gzip_bomb_is_stopped_by_the_ratio_cap() -> None:
    bomb = zero_bomb("gzip", 128 * MiB)
    checker = StreamChecker("gzip", max_ratio=1000)
    with pytest.raises(IntegrityError, match="decompression bomb"):
        checker.feed(bomb)
    assert checker.output_bytes < 128 * MiB


def test_zstd_bomb_is_stopped_by_max_output_without_a_ratio(zstd_bomb: bytes) -> None:
    checker = StreamChecker("zstd", max_output=100 * MiB)
    with pytest.raises(IntegrityError, match="beyond the limit"):
        for chunk in chunks(zstd_bomb, 65536):
            checker.feed(chunk)
    assert checker.output_bytes < 200 * MiB


def test_highly_compressible_data_under_the_grace_is_not_a_bomb() -> None:
    """The ratio is judged only past RATIO_GRACE of output, so a small sparse dump passes."""
    size = 16 * MiB
    assert size < RATIO_GRACE
    checker = StreamChecker("zstd", max_ratio=2)
    checker.feed(zero_bomb("zstd", size))
    checker.finish()
    assert checker.output_bytes == size


# --- the tail ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 100, 5000])
@pytest.mark.parametrize("kind", KINDS)
def test_tail_keeps_the_last_bytes_of_the_output(kind: str, chunk: int | None) -> None:
    data = SMALL * 4 + b"\n-- Dump completed on 2026-11-26 10:00:00\n"
    checker = StreamChecker(kind)
    stream = compress(kind, data, chunk=chunk or len(data))
    for part in chunks(stream, chunk or len(stream)):
        checker.feed(part)
    checker.finish()
    assert len(checker.tail) == TAIL_BYTES
    assert checker.tail == data[-TAIL_BYTES:]


@pytest.mark.parametrize("kind", KINDS)
def test_tail_of_short_output_is_the_whole_output(kind: str) -> None:
    checker = StreamChecker(kind)
    checker.feed(compress(kind, b"short\n"))
    checker.finish()
    assert checker.tail == b"short\n"


def test_a_finished_checker_is_freed_without_the_cycle_collector() -> None:
    """No reference cycle through zstandard's writer: each verified backup's decoder
    is freed as soon as it is dropped (the collector verifies backups for years)."""
    import gc
    import weakref

    compressor = make_compressor("zstd")
    payload = compressor.compress(b"-- Dump completed\n" * 1000) + compressor.flush()
    gc.disable()
    try:
        checker = StreamChecker("zstd")
        checker.feed(payload)
        alive = weakref.ref(checker)
        del checker
        assert alive() is None
    finally:
        gc.enable()
