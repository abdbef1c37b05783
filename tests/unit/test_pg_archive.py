"""The PostgreSQL completeness checks of common.pg_archive, on archives built byte by byte.

The builder writes the custom format as pg_dump does (header, TOC, data blocks); the
integration suite runs the same checker on real pg_dump output.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import IntegrityError
from common.pg_archive import PgArchiveChecker, PgSqlChecker


def pg_int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


def pg_str(value: str | None) -> bytes:
    if value is None:
        return pg_int(-1)
    raw = value.encode()
    return pg_int(len(raw)) + raw


def header(version: tuple[int, int] = (1, 14)) -> bytes:
    out = b"PGDMP" + bytes([version[0], version[1], 0, 4, 8, 1])
    out += bytes([0]) if version >= (1, 15) else pg_int(0)
    out += b"".join(pg_int(v) for v in (0, 30, 17, 2, 11, 126, 0))
    return out + pg_str("hospital") + pg_str("15.18") + pg_str("15.18")


def entry(dump_id: int, *, data: bool, version: tuple[int, int] = (1, 14),
          deps: tuple[int, ...] = ()) -> bytes:
    out = pg_int(dump_id) + pg_int(1 if data else 0) + pg_str("0") + pg_str("0")
    out += pg_str(f"t{dump_id}") + pg_str("TABLE DATA" if data else "TABLE") + pg_int(3)
    out += pg_str("CREATE ...;\n") + pg_str(None) + pg_str("COPY t FROM stdin;\n")
    out += pg_str("public") + pg_str(None)
    out += pg_str("heap")  # tableam, 1.14 and later
    if version >= (1, 16):
        out += pg_int(ord("r"))
    out += pg_str("owner") + pg_str("false")
    out += b"".join(pg_str(str(d)) for d in deps) + pg_str(None)
    return out + bytes([1 if data else 3]) + bytes(8)


def data_block(dump_id: int, rows: list[bytes]) -> bytes:
    body = b"".join(pg_int(len(row)) + row for row in rows)
    return bytes([1]) + pg_int(dump_id) + body + pg_int(0)


def blobs_block(dump_id: int, objects: dict[int, bytes]) -> bytes:
    out = bytes([3]) + pg_int(dump_id)
    for oid, content in objects.items():
        chunk = pg_int(len(content)) + content if content else b""  # none for an empty one
        out += pg_int(oid) + chunk + pg_int(0)
    return out + pg_int(0)


def archive(version: tuple[int, int] = (1, 14)) -> bytes:
    toc = [entry(1, data=False, version=version), entry(2, data=True, version=version,
                                                         deps=(1,)),
           entry(3, data=True, version=version), entry(4, data=False, version=version)]
    return (header(version) + pg_int(len(toc)) + b"".join(toc)
            + data_block(2, [b"1\tx\n", b"2\t\\000\n", b"\\.\n\n\n"])
            + blobs_block(3, {16393: b"hello\x00", 16394: b""}))


def check(data: bytes, piece: int = 0) -> dict[str, object]:
    checker = PgArchiveChecker()
    step = piece or max(len(data), 1)
    for start in range(0, len(data), step):
        checker.feed(data[start:start + step])
    return checker.finish()


@pytest.mark.parametrize("version", [(1, 14), (1, 15), (1, 16)])
def test_a_whole_archive_passes_with_its_facts(version: tuple[int, int]) -> None:
    facts = check(archive(version))["pg_archive"]
    assert isinstance(facts, dict)
    assert facts["toc_entries"] == 4 and facts["data_entries"] == 2
    assert facts["tables"] == 2  # the entries without data are the tables here
    assert facts["large_objects"] == 2
    assert facts["archive_version"] == f"{version[0]}.{version[1]}.0"


def test_an_archive_cut_at_any_byte_is_refused() -> None:
    data = archive()
    for cut in range(len(data)):
        with pytest.raises(IntegrityError, match="did not finish"):
            check(data[:cut])


@given(st.integers(min_value=1, max_value=64))
def test_the_verdict_does_not_depend_on_how_the_bytes_are_split(piece: int) -> None:
    assert check(archive(), piece) == check(archive())


def test_a_missing_data_block_is_refused_by_entry() -> None:
    data = archive()
    without_blobs = data[: data.rindex(bytes([3]) + pg_int(3))]
    with pytest.raises(IntegrityError, match=r"lacks the data of 1 TOC entry \(3\)"):
        check(without_blobs)


def test_bytes_after_the_last_block_are_refused() -> None:
    with pytest.raises(IntegrityError):
        check(archive() + b"\x01")


def test_a_block_for_an_entry_without_data_is_refused() -> None:
    data = archive().replace(bytes([1]) + pg_int(2) + pg_int(4), bytes([1]) + pg_int(1)
                              + pg_int(4))
    with pytest.raises(IntegrityError, match="unexpected data block for entry 1"):
        check(data)


def test_a_block_twice_is_refused() -> None:
    with pytest.raises(IntegrityError, match="unexpected data block for entry 2"):
        check(archive() + data_block(2, [b"again\n"]))


def test_an_unknown_block_type_is_refused() -> None:
    with pytest.raises(IntegrityError, match="unknown block type 9"):
        check(archive() + bytes([9]) + pg_int(2))


def test_a_negative_chunk_length_is_refused() -> None:
    data = archive()
    block = bytes([1]) + pg_int(2)
    at = data.index(block) + len(block)
    with pytest.raises(IntegrityError, match="bad chunk length"):
        check(data[:at] + pg_int(-5) + data[at + 5:])


def test_a_chunk_longer_than_the_limit_is_refused_without_waiting_for_it() -> None:
    data = archive()
    block = bytes([1]) + pg_int(2)
    at = data.index(block) + len(block)
    checker = PgArchiveChecker()
    with pytest.raises(IntegrityError, match="bad chunk length 4294967295"):
        checker.feed(data[:at] + pg_int(2**32 - 1) + b"partial row")


@pytest.mark.parametrize(("data", "message"), [
    (b"PGDMX" + bytes(40), "no PGDMP header"),
    (b"PGDMP" + bytes([1, 13, 0, 4, 8, 1]) + bytes(40), "version 1.13"),
    (b"PGDMP" + bytes([1, 17, 0, 4, 8, 1]) + bytes(40), "version 1.17"),
    (b"PGDMP" + bytes([1, 14, 0, 4, 8, 3]) + bytes(40), "not custom format"),
])
def test_what_is_not_a_custom_archive_is_refused_at_once(data: bytes, message: str) -> None:
    checker = PgArchiveChecker()
    with pytest.raises(IntegrityError, match=message):
        checker.feed(data)


def test_a_huge_string_length_is_refused_without_waiting_for_it() -> None:
    data = header()[:-len(pg_str("15.18"))] + pg_int(2**31 - 1)
    with pytest.raises(IntegrityError, match="bad string length"):
        PgArchiveChecker().feed(data)


DUMPALL = (b"--\n-- PostgreSQL database cluster dump\n--\n\nCREATE ROLE app;\n"
           b"--\n-- PostgreSQL database cluster dump complete\n--\n\n")


def test_plain_sql_passes_only_when_it_ends_with_the_completion_comment() -> None:
    for cut in range(len(DUMPALL) + 1):
        checker = PgSqlChecker()
        checker.feed(DUMPALL[:cut])
        if cut == len(DUMPALL):
            assert checker.finish() == {}
        else:
            with pytest.raises(IntegrityError, match="no completion comment"):
                checker.finish()


def test_plain_sql_of_pg_dump_passes_too() -> None:
    checker = PgSqlChecker()
    for byte in b"SET x = 1;\n--\n-- PostgreSQL database dump complete\n--\n\n":
        checker.feed(bytes([byte]))
    assert checker.finish() == {}


@pytest.mark.parametrize("fmt", ["pgdump", "pgsql"])
def test_the_shared_integrity_checker_runs_the_postgresql_checkers(fmt: str) -> None:
    """The one checker (ingest, verify, restore) takes both PostgreSQL formats; a cut
    stream is refused at END."""
    import hashlib

    import zstandard

    from common.integrity import IntegrityChecker

    raw = archive() if fmt == "pgdump" else DUMPALL
    for data, whole in ((raw, True), (raw[:-1], False)):
        stream = zstandard.ZstdCompressor(level=3).compress(data)
        verifier = IntegrityChecker(fmt, "zstd", max_ratio=None)
        verifier.feed(stream)
        digest = hashlib.sha256(stream).hexdigest()
        if whole:
            assert verifier.finish(len(stream), digest)["uncompressed_bytes"] == len(data)
        else:
            with pytest.raises(IntegrityError, match="did not finish"):
                verifier.finish(len(stream), digest)
