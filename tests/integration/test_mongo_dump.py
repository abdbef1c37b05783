"""MongoDB dump and restore against a real wire-protocol server (nx-27017) on loopback.

nx-27017 is not type-faithful (it refuses Decimal128, Timestamp, Regex, MinKey/MaxKey and
narrows some types), has no views, replica sets or oplog, and renames indexes; the data
here sticks to what it keeps, and indexes are compared by key and options.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any, cast

import bson
import pymongo
import pytest
from bson.binary import Binary
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from agent.engines.mongo_connect import MongoParams
from agent.engines.mongo_dump import MongoDump
from agent.engines.mongo_inspect import discover_databases, preflight
from agent.restore.mongo_loader import restore_archive
from common.errors import ConfigError, DumpError, IntegrityError
from common.mongo_archive import ArchiveReader, Prelude, verify_archive
from tests.integration.loopback import free_port
from tests.integration.mongo_server import NxServer

pytestmark = pytest.mark.integration

PATIENTS = 100_000
FUTURE = datetime.datetime(2100, 1, 1)  # TTL-indexed dates must not expire during the test
RAW: bson.CodecOptions[RawBSONDocument] = bson.CodecOptions(document_class=RawBSONDocument)
MongoClient = pymongo.MongoClient[dict[str, Any]]


def visit(i: int) -> dict[str, Any]:
    return {
        "_id": ObjectId(),
        "patient": i % 97,
        "when": datetime.datetime(2026, 11, 26, 8, 30, 15, (i % 1000) * 1000),
        "expires": FUTURE,
        "scan": Binary(bytes(range(256)) * 4 + i.to_bytes(4, "little")),
        "vitals": {"bp": [120 + i % 7, 80], "notes": {"text": "Ünïcødé ✓", "flag": i % 2 == 0}},
        "billing": Int64(2**40 + i),
        "weight": 70.5 + i / 10,
        "missing": None,
    }


@pytest.fixture(scope="module")
def source(client: MongoClient) -> MongoClient:
    """Databases ``clinic`` (100k+ documents, indexes, an empty collection) and ``lab``."""
    clinic = client["clinic"]
    clinic.patients.insert_many(
        ({"_id": i, "mrn": f"MRN{i:07d}", "age": i % 100} for i in range(PATIENTS)),
        ordered=False,
    )
    clinic.patients.create_index("mrn", unique=True)
    clinic.visits.insert_many(visit(i) for i in range(500))
    clinic.visits.create_index("expires", expireAfterSeconds=3600)
    clinic.visits.create_index([("patient", 1), ("when", -1)])
    clinic.create_collection("empty")
    client["lab"].results.insert_many({"_id": f"r{i}", "value": i * 1.5} for i in range(50))
    return client


async def dump_all(
    params: MongoParams, database: str, **options: Any
) -> tuple[list[bytes], MongoDump]:
    chunks = []
    async with MongoDump(params, database, **options) as dump:
        async for chunk in dump:
            chunks.append(chunk)
    return chunks, dump


def raw_documents(client: MongoClient, db: str, coll: str) -> list[bytes]:
    collection = client[db].get_collection(coll, codec_options=RAW)
    docs = collection.find({}, sort=[("_id", 1)], batch_size=5000)
    return [bytes(cast("RawBSONDocument", doc).raw) for doc in docs]


def index_shapes(client: MongoClient, db: str, coll: str) -> list[tuple[Any, ...]]:
    shapes = []
    for index in client[db][coll].list_indexes():
        extra = {k: v for k, v in index.items() if k in ("unique", "expireAfterSeconds")}
        shapes.append((list(index["key"].items()), sorted(extra.items())))
    return sorted(shapes, key=repr)


async def test_round_trip_restores_collections_into_another_database(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    """Every document comes back byte for byte, with indexes and the empty collection."""
    chunks, dump = await dump_all(mongo_params, "clinic")
    assert max(map(len, chunks)) <= 256 * 1024
    assert dump.point_in_time is False
    summary = verify_archive(chunks)
    assert summary["collections"]["clinic.patients"]["documents"] == PATIENTS
    assert dump.metadata["collections"]["patients"]["documents"] == PATIENTS
    assert dump.metadata["server_version"].count(".") == 2

    result = await asyncio.to_thread(restore_archive, mongo_params, chunks, "clinic_copy")

    assert result.collections == {
        "clinic_copy.empty": 0,
        "clinic_copy.patients": PATIENTS,
        "clinic_copy.visits": 500,
    }
    assert result.indexes == 3
    for coll in ("patients", "visits", "empty"):
        assert raw_documents(source, "clinic_copy", coll) == raw_documents(source, "clinic", coll)
        assert index_shapes(source, "clinic_copy", coll) == index_shapes(source, "clinic", coll)
    assert "empty" in source["clinic_copy"].list_collection_names()


async def test_second_database_round_trips(source: MongoClient, mongo_params: MongoParams) -> None:
    chunks, _ = await dump_all(mongo_params, "lab")
    result = await asyncio.to_thread(restore_archive, mongo_params, chunks, "lab_copy")
    assert result.documents == 50
    assert raw_documents(source, "lab_copy", "results") == raw_documents(source, "lab", "results")


async def test_archive_prelude_describes_collections_and_indexes(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    chunks, _ = await dump_all(mongo_params, "lab")
    prelude = ArchiveReader().feed(b"".join(chunks))[0]
    assert isinstance(prelude, Prelude)
    assert prelude.header.version == "0.1"
    (entry,) = prelude.namespaces
    assert (entry.db, entry.collection, entry.type) == ("lab", "results", "collection")
    assert '"collectionName":"results"' in entry.metadata
    assert '"key":{"_id":{"$numberInt":"1"}}' in entry.metadata


def test_discover_all_excludes_system_databases(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    names = discover_databases(mongo_params)
    assert {"clinic", "lab"} <= set(names)
    assert not {"admin", "local", "config"} & set(names)


def test_preflight_reports_collections_and_estimates(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    report = preflight(mongo_params, "clinic")
    assert report.is_replica_set is False
    assert report.oplog_start is None
    counts = {c.name: c.documents for c in report.collections}
    assert counts == {"empty": 0, "patients": PATIENTS, "visits": 500}
    assert report.size_estimate > 0


def test_missing_database_is_a_dump_error(source: MongoClient, mongo_params: MongoParams) -> None:
    with pytest.raises(DumpError, match="does not exist"):
        preflight(mongo_params, "no_such_database")


async def test_point_in_time_needs_a_replica_set(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    with pytest.raises(DumpError, match="replica set"):
        await dump_all(mongo_params, "lab", oplog=True)


async def test_server_down_is_a_dump_error() -> None:
    params = MongoParams(f"mongodb://127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(DumpError, match="connecting failed"):
        await dump_all(params, "clinic")
    with pytest.raises(DumpError):
        preflight(params, "clinic")
    with pytest.raises(DumpError):
        discover_databases(params)


async def test_server_killed_mid_dump_is_a_dump_error(private_nx_server: NxServer) -> None:
    """The dump fails with DumpError instead of ending as if it were complete."""
    mongo: MongoClient = pymongo.MongoClient(private_nx_server.uri)
    mongo["ward"].beds.insert_many({"_id": i, "pad": "x" * 80} for i in range(20_000))
    mongo.close()
    params = MongoParams(private_nx_server.uri, timeout=1.0, socket_timeout=5.0)
    received = 0
    started = time.monotonic()
    with pytest.raises(DumpError, match="dumping 'ward' failed"):
        async with MongoDump(
            params, "ward", chunk_size=16 * 1024, queue_chunks=2, batch_size=200
        ) as dump:
            async for chunk in dump:
                received += len(chunk)
                if received == len(chunk):
                    private_nx_server.kill()
    assert time.monotonic() - started < 30
    assert received < 20_000 * 100


async def test_consumer_leaving_early_stops_the_worker(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    async with MongoDump(mongo_params, "clinic", queue_chunks=2) as dump:
        async for _chunk in dump:
            break
    assert dump._thread is not None
    assert not dump._thread.is_alive()


async def test_failed_authentication_never_shows_the_password(
    source: MongoClient, nx_server: NxServer
) -> None:
    """nx-27017 cannot authenticate, so this is the failure path of a bad login."""
    params = MongoParams(nx_server.uri, username="backup", password="s3cr3t-Pa55", timeout=2.0)
    assert "s3cr3t" not in repr(params)
    with pytest.raises(DumpError) as caught:
        await dump_all(params, "clinic")
    assert "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in repr(caught.value)


def test_password_in_uri_is_refused() -> None:
    with pytest.raises(ConfigError, match="password") as caught:
        MongoParams("mongodb://backup:s3cr3t@127.0.0.1:27017/")
    assert "s3cr3t" not in str(caught.value)


async def test_restore_refuses_existing_collections_unless_drop(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    chunks, _ = await dump_all(mongo_params, "lab")
    await asyncio.to_thread(restore_archive, mongo_params, chunks, "lab_again")
    with pytest.raises(DumpError, match="already has results"):
        await asyncio.to_thread(restore_archive, mongo_params, chunks, "lab_again")
    result = await asyncio.to_thread(restore_archive, mongo_params, chunks, "lab_again", True)
    assert result.documents == 50
    assert source["lab_again"].results.count_documents({}) == 50


async def test_restore_refuses_a_corrupt_archive(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    chunks, _ = await dump_all(mongo_params, "lab")
    good = b"".join(chunks)
    data = bytearray(good)
    data[data.index(b"r17")] = ord("R")  # same framing, different bytes: only the CRC sees it
    with pytest.raises(IntegrityError, match="CRC mismatch"):
        await asyncio.to_thread(restore_archive, mongo_params, [bytes(data)], "lab_corrupt")
    with pytest.raises(IntegrityError, match="truncated"):
        await asyncio.to_thread(restore_archive, mongo_params, [good[:-3]], "lab_cut")


async def test_users_and_roles_are_dumped_and_not_replayed(
    source: MongoClient, mongo_params: MongoParams
) -> None:
    """They ride in the namespaces mongorestore --restoreDbUsersAndRoles reads."""
    chunks, _ = await dump_all(mongo_params, "lab", include_users_and_roles=True)
    prelude = ArchiveReader().feed(b"".join(chunks))[0]
    assert isinstance(prelude, Prelude)
    names = [ns.collection for ns in prelude.namespaces]
    assert names[:3] == ["$admin.system.users", "$admin.system.roles", "$admin.system.version"]
    result = await asyncio.to_thread(restore_archive, mongo_params, chunks, "lab_users")
    assert result.skipped == (
        "lab.$admin.system.users",
        "lab.$admin.system.roles",
        "lab.$admin.system.version",
    )
    assert result.documents == 50
