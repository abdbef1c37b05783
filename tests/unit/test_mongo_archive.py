"""The mongodump archive writer, reader and verifier, byte by byte and without a server."""

from __future__ import annotations

import datetime
import itertools
import struct
import uuid
from collections.abc import Iterable
from typing import Any

import bson
import pytest
from bson.binary import Binary
from bson.code import Code
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import IntegrityError
from common.mongo_archive import (
    MAGIC_BYTES,
    MAX_DOCUMENT_SIZE,
    TERMINATOR,
    ArchiveHeader,
    ArchiveReader,
    ArchiveVerifier,
    ArchiveWriter,
    CollectionMetadata,
    Document,
    Event,
    NamespaceEnd,
    NamespaceMetadata,
    Prelude,
    crc64_xz,
    iter_events,
    to_int64,
    verify_archive,
)

HEADER = ArchiveHeader(server_version="7.0.12", tool_version="backhaul-test")


def typed_documents() -> list[bytes]:
    """Documents holding every BSON type, encoded here so the test owns the bytes."""
    when = datetime.datetime(2026, 11, 26, 12, 30, 1, 123000, tzinfo=datetime.UTC)
    docs: list[dict[str, Any]] = [
        {"_id": ObjectId(), "dec": Decimal128("1234.5678901234567890"), "ts": Timestamp(17, 4)},
        {"_id": 2, "re": Regex("^pat.*$", "im"), "min": MinKey(), "max": MaxKey()},
        {"_id": Int64(3), "bin": Binary(b"\x00\xff" * 40), "uuid": Binary(uuid.uuid4().bytes, 4)},
        {
            "_id": "four",
            "user_bin": Binary(b"abc", 0x80),
            "date": when,
            "old": datetime.datetime(1, 1, 1),
        },
        {"_id": 5.5, "nested": {"a": [1, {"b": [Int64(2**62), -(2**31)]}, []], "c": {}}},
        {"_id": 6, "code": Code("f()"), "scoped": Code("g(x)", {"x": 1}), "ref": DBRef("c", 1)},
        {"_id": 7, "none": None, "t": True, "f": False, "inf": float("inf"), "ü": "ñ\u2603"},
        {"_id": 8, "i64": Int64(-(2**63)), "i32": 2**31 - 1, "big": "x" * 3000},
    ]
    return [bson.encode(doc) for doc in docs]


def namespaces() -> list[NamespaceMetadata]:
    meta = CollectionMetadata(
        indexes=[{"v": 2, "key": {"_id": 1}, "name": "_id_"}],
        collection_name="people",
        type="collection",
    )
    view = CollectionMetadata(
        options={"viewOn": "people", "pipeline": [{"$match": {"a": 1}}]},
        collection_name="adults",
        type="view",
    )
    return [
        NamespaceMetadata("hospital", "people", meta.to_json(), 1234, "collection"),
        NamespaceMetadata("hospital", "empty", "", 0, "collection"),
        NamespaceMetadata("hospital", "adults", view.to_json(), 0, "view"),
        NamespaceMetadata("", "oplog", "", 0, ""),
    ]


def build_archive(docs: list[bytes], *, block_size: int = 300, end_all: bool = True) -> bytes:
    """Documents go to hospital.people; the oplog gets the first two documents."""
    writer = ArchiveWriter(block_size=block_size)
    out = [writer.prelude(HEADER, namespaces())]
    out.append(writer.begin_block("hospital", "people"))
    out.extend(writer.document(doc) for doc in docs)
    out.append(writer.end_namespace("hospital", "people"))
    out.append(writer.end_namespace("hospital", "empty"))
    out.append(writer.end_namespace("hospital", "adults"))
    out.append(writer.begin_block("", "oplog"))
    out.append(writer.documents(b"".join(docs[:2])))
    if end_all:
        out.append(writer.end_namespace("", "oplog"))
        assert writer.unfinished == []
    return b"".join(out)


def read_all(chunks: Iterable[bytes]) -> list[Event]:
    reader = ArchiveReader()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    reader.close()
    return events


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_crc64_xz_known_answer() -> None:
    assert crc64_xz(b"123456789") == 0x995DC9BBDF1939FA
    assert crc64_xz(b"") == 0


def test_crc64_xz_continues_across_pieces() -> None:
    data = bytes(range(256)) * 50
    crc = 0
    for piece in split(data, 77):
        crc = crc64_xz(piece, crc)
    assert crc == crc64_xz(data)


def test_to_int64_matches_bson_int64_storage() -> None:
    assert (
        to_int64(0x995DC9BBDF1939FA)
        == struct.unpack("<q", struct.pack("<Q", 0x995DC9BBDF1939FA))[0]
    )
    assert to_int64(5) == 5


def test_round_trip_keeps_every_type_byte_for_byte() -> None:
    """Documents come back byte-identical, in order, in the namespaces they were written to."""
    docs = typed_documents()
    events = read_all([build_archive(docs)])
    prelude = events[0]
    assert isinstance(prelude, Prelude)
    assert prelude.header == HEADER
    assert prelude.namespaces == tuple(namespaces())
    people = [e.raw for e in events if isinstance(e, Document) and e.collection == "people"]
    oplog = [e.raw for e in events if isinstance(e, Document) and e.db == ""]
    assert people == docs
    assert oplog == docs[:2]
    assert bson.decode(people[0])["dec"] == Decimal128("1234.5678901234567890")
    ends = [e for e in events if isinstance(e, NamespaceEnd)]
    assert [(e.db, e.collection, e.crc_ok) for e in ends] == [
        ("hospital", "people", True),
        ("hospital", "empty", True),
        ("hospital", "adults", True),
        ("", "oplog", True),
    ]
    assert ends[0].documents == len(docs)
    assert ends[0].bytes == sum(map(len, docs))


def test_byte_at_a_time_feeding_gives_the_same_events() -> None:
    data = build_archive(typed_documents())
    assert read_all(split(data, 1)) == read_all([data])


def test_writer_cuts_blocks_at_block_size() -> None:
    """Small blocks mean many namespace headers, each followed by whole documents only."""
    docs = typed_documents()
    small = build_archive(docs, block_size=1)
    large = build_archive(docs, block_size=1 << 20)
    header_len = len(bson.encode({"db": "hospital", "collection": "people", "EOF": False}))
    assert len(small) > len(large) + (len(docs) - 2) * header_len
    assert read_all([small]) == read_all([large])


def test_writer_output_matches_the_format_built_by_hand() -> None:
    """An archive assembled from the spec by hand equals the writer's bytes."""
    doc = bson.encode({"_id": 1})
    ns = NamespaceMetadata("d", "c", "", 0, "collection")
    writer = ArchiveWriter()
    produced = b"".join(
        [
            writer.prelude(HEADER, [ns]),
            writer.begin_block("d", "c"),
            writer.document(doc),
            writer.end_namespace("d", "c"),
        ]
    )
    header = bson.encode(
        {
            "concurrent_collections": 1,
            "version": "0.1",
            "server_version": "7.0.12",
            "tool_version": "backhaul-test",
        }
    )
    entry = bson.encode(
        {"db": "d", "collection": "c", "metadata": "", "size": 0, "type": "collection"}
    )
    crc = struct.unpack("<q", struct.pack("<Q", crc64_xz(doc)))[0]
    expected = b"".join(
        [
            struct.pack("<I", 0x8199E26D),
            header,
            entry,
            b"\xff\xff\xff\xff",
            bson.encode({"db": "d", "collection": "c", "EOF": False, "CRC": Int64(0)}),
            doc,
            b"\xff\xff\xff\xff",
            bson.encode({"db": "d", "collection": "c", "EOF": True, "CRC": Int64(crc)}),
            b"\xff\xff\xff\xff",
        ]
    )
    assert produced == expected


def test_empty_namespace_gets_an_empty_block_before_its_eof() -> None:
    """Like mongodump, so mongorestore sees the namespace open before it ends."""
    writer = ArchiveWriter()
    writer.prelude(HEADER, [NamespaceMetadata("d", "v", "", 0, "view")])
    out = writer.end_namespace("d", "v")
    opened = bson.encode({"db": "d", "collection": "v", "EOF": False, "CRC": Int64(0)})
    closed = bson.encode({"db": "d", "collection": "v", "EOF": True, "CRC": Int64(0)})
    assert out == opened + TERMINATOR + closed + TERMINATOR


def test_reader_accepts_interleaved_namespaces() -> None:
    """mongodump dumps collections in parallel, so blocks of namespaces interleave."""
    docs = typed_documents()
    a = NamespaceMetadata("d", "a", "", 0, "collection")
    b = NamespaceMetadata("d", "b", "", 0, "collection")
    writer = ArchiveWriter()
    parts = [writer.prelude(HEADER, [a, b])]
    for i, doc in enumerate(docs):
        coll = "a" if i % 2 else "b"
        parts += [writer.begin_block("d", coll), writer.document(doc)]
    parts += [writer.end_namespace("d", "a"), writer.end_namespace("d", "b")]
    events = read_all([b"".join(parts)])
    assert [e.raw for e in events if isinstance(e, Document) and e.collection == "a"] == docs[1::2]
    assert all(e.crc_ok for e in events if isinstance(e, NamespaceEnd))


def test_verifier_counts_without_keeping_documents() -> None:
    docs = typed_documents()
    data = build_archive(docs)
    summary = verify_archive(split(data, 1000))
    assert summary["namespaces"] == 4
    assert summary["documents"] == len(docs) + 2
    assert summary["archive_bytes"] == len(data)
    assert summary["server_version"] == "7.0.12"
    assert summary["collections"]["hospital.people"] == {
        "documents": len(docs),
        "bytes": sum(map(len, docs)),
    }
    assert summary["collections"]["hospital.empty"] == {"documents": 0, "bytes": 0}


def test_truncation_at_every_offset_is_detected() -> None:
    """Any proper prefix of an archive fails, in feed or in close."""
    data = build_archive(typed_documents()[:3], block_size=100)
    for cut in range(len(data)):
        with pytest.raises(IntegrityError):
            list(iter_events([data[:cut]]))
        verifier = ArchiveVerifier()
        with pytest.raises(IntegrityError):
            verifier.feed(data[:cut])
            verifier.finish()


def test_crc_mismatch_is_reported_and_refused() -> None:
    docs = typed_documents()
    data = bytearray(build_archive(docs))
    target = data.index("ñ\u2603".encode())  # inside a document, framing intact
    data[target] ^= 0x01
    reader = ArchiveReader()
    events = reader.feed(bytes(data))
    people = next(e for e in events if isinstance(e, NamespaceEnd) and e.collection == "people")
    assert people.crc_ok is False
    with pytest.raises(IntegrityError, match="CRC mismatch"):
        reader.close()
    with pytest.raises(IntegrityError, match="CRC mismatch"):
        verify_archive([bytes(data)])


def test_missing_eof_block_is_detected() -> None:
    data = build_archive(typed_documents(), end_all=False) + TERMINATOR
    with pytest.raises(IntegrityError, match="oplog"):
        verify_archive([data])
    with pytest.raises(IntegrityError, match="oplog"):
        list(iter_events([data]))


def test_bad_magic_is_refused() -> None:
    with pytest.raises(IntegrityError, match="gzip"):
        ArchiveReader().feed(b"\x1f\x8b\x08\x00" + bytes(100))


def test_unsupported_version_is_refused() -> None:
    header = bson.encode({"version": "9.9", "server_version": "7.0.0"})
    with pytest.raises(IntegrityError, match="version"):
        ArchiveReader().feed(MAGIC_BYTES + header)


def test_oversized_length_is_refused_before_buffering() -> None:
    """A huge declared length fails at once instead of waiting for 2 GiB of input."""
    data = build_archive([])
    prelude_end = data.index(TERMINATOR) + 4
    forged = data[:prelude_end] + struct.pack("<i", MAX_DOCUMENT_SIZE + 1)
    with pytest.raises(IntegrityError, match="valid BSON length"):
        ArchiveReader().feed(forged)


def test_block_for_unknown_namespace_is_refused() -> None:
    writer = ArchiveWriter()
    data = writer.prelude(HEADER, [NamespaceMetadata("d", "c")])
    stray = bson.encode({"db": "d", "collection": "other", "EOF": False, "CRC": Int64(0)})
    with pytest.raises(IntegrityError, match="does not announce"):
        ArchiveReader().feed(data + stray)


def test_block_after_eof_is_refused() -> None:
    writer = ArchiveWriter()
    data = writer.prelude(HEADER, [NamespaceMetadata("d", "c")]) + writer.end_namespace("d", "c")
    again = bson.encode({"db": "d", "collection": "c", "EOF": False, "CRC": Int64(0)})
    with pytest.raises(IntegrityError, match="after its EOF"):
        ArchiveReader().feed(data + again)


def test_duplicate_prelude_entry_is_refused() -> None:
    entry = bson.encode({"db": "d", "collection": "c", "metadata": "", "size": 0})
    header = bson.encode({"version": "0.1", "server_version": "7.0.0"})
    with pytest.raises(IntegrityError, match="repeats"):
        ArchiveReader().feed(MAGIC_BYTES + header + entry + entry)


@pytest.mark.parametrize("db", [Code("d"), 5, None, "nul\x00name"])
def test_namespace_names_must_be_plain_strings(db: object) -> None:
    """bson.Code subclasses str; it must not pass for a database name."""
    entry = bson.encode({"db": db, "collection": "c", "metadata": ""})
    header = bson.encode({"version": "0.1", "server_version": "7.0.0"})
    with pytest.raises(IntegrityError, match="prelude entry db"):
        ArchiveReader().feed(MAGIC_BYTES + header + entry)


def test_malformed_metadata_json_is_refused() -> None:
    entry = bson.encode({"db": "d", "collection": "c", "metadata": '{"indexes":[{"key":{"{"a"'})
    header = bson.encode({"version": "0.1", "server_version": "7.0.0"})
    with pytest.raises(IntegrityError, match="Extended JSON"):
        ArchiveReader().feed(MAGIC_BYTES + header + entry)


def test_reader_stays_failed_after_an_error() -> None:
    reader = ArchiveReader()
    with pytest.raises(IntegrityError):
        reader.feed(b"garbage!")
    with pytest.raises(IntegrityError, match="already failed"):
        reader.feed(build_archive([]))
    with pytest.raises(IntegrityError):
        reader.close()


def test_metadata_json_is_canonical_extended_json() -> None:
    meta = CollectionMetadata(
        options={"capped": True, "size": Int64(4096)},
        indexes=[{"v": 2, "key": {"_id": 1}, "name": "_id_"}],
        uuid="0123456789abcdef0123456789abcdef",
        collection_name="c",
        type="collection",
    )
    text = meta.to_json()
    assert text.startswith('{"options":{"capped":true,"size":{"$numberLong":"4096"}},')
    assert '"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},' in text
    assert text.endswith(
        '"uuid":"0123456789abcdef0123456789abcdef","collectionName":"c","type":"collection"}'
    )
    assert CollectionMetadata.from_json(text) == meta


def test_metadata_without_options_leaves_them_out() -> None:
    text = CollectionMetadata(collection_name="c").to_json()
    assert text == '{"indexes":[],"collectionName":"c"}'


@pytest.mark.parametrize(
    "text", ["", "[]", "{", '{"indexes": 3}', '{"options": [1]}', '{"uuid": 1}']
)
def test_malformed_metadata_raises_integrity_error(text: str) -> None:
    with pytest.raises(IntegrityError):
        CollectionMetadata.from_json(text)


def test_writer_refuses_out_of_order_calls() -> None:
    writer = ArchiveWriter()
    with pytest.raises(ValueError, match="no block"):
        writer.document(bson.encode({}))
    writer.prelude(HEADER, [NamespaceMetadata("d", "c")])
    with pytest.raises(ValueError, match="already"):
        writer.prelude(HEADER, [])
    with pytest.raises(ValueError, match="not in the prelude"):
        writer.begin_block("d", "x")
    writer.end_namespace("d", "c")
    with pytest.raises(ValueError, match="already ended"):
        writer.begin_block("d", "c")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x05\x00\x00\x00",
        b"\x07\x00\x00\x00\x00\x00",
        b"\x05\x00\x00\x00\x01",
        b"\x04\x00\x00\x00\x00",
    ],
)
def test_writer_refuses_malformed_documents(raw: bytes) -> None:
    writer = ArchiveWriter()
    writer.prelude(HEADER, [NamespaceMetadata("d", "c")])
    writer.begin_block("d", "c")
    with pytest.raises(IntegrityError):
        writer.document(raw)


def run_reader(chunks: list[bytes]) -> None:
    """Feed and close; only IntegrityError may escape."""
    reader = ArchiveReader()
    verifier = ArchiveVerifier()
    try:
        for chunk in chunks:
            reader.feed(chunk)
        reader.close()
    except IntegrityError:
        pass
    try:
        for chunk in chunks:
            verifier.feed(chunk)
        verifier.finish()
    except IntegrityError:
        pass


VALID = build_archive(typed_documents()[:4], block_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_garbage_only_raises_integrity_error(data: bytes) -> None:
    run_reader([data])
    run_reader([MAGIC_BYTES + data])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
    st.integers(1, 300),
)
def test_mutated_archives_only_raise_integrity_error(
    edits: list[tuple[int, int]], chunk: int
) -> None:
    data = bytearray(VALID)
    for offset, value in edits:
        data[offset] = value
    run_reader(split(bytes(data), chunk))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(VALID)), max_size=6))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    bounds = sorted({0, len(VALID), *cuts})
    chunks = [VALID[a:b] for a, b in itertools.pairwise(bounds)]
    assert read_all(chunks) == read_all([VALID])
