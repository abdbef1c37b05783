"""MongoDB end to end: nx-27017, the real `backhaul-agent` command, a real collector.

Each stored `<db>_<yyyymmdd>.archive.gz` is restored with the pymongo restorer into a
database of its own and compared document by document. Failures (server down, a login
refused, the server killed mid-dump, a cursor killed mid-dump) must leave no file and say
why on both sides, and the collector must refuse archives that are corrupt or truncated
even when their SHA-256 is right.

nx-27017 has no replica sets, views or authentication, and refuses some BSON types; the
data sticks to what it keeps (see test_mongo_dump.py).
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import json
import os
import re
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import bson
import pymongo
import pytest
from bson.binary import Binary
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from agent.config import load_agent_config
from agent.engines.mongo_connect import MongoParams
from agent.engines.mongo_dump import MongoDump
from agent.link.connection import CollectorClient
from agent.restore.mongo_loader import restore_archive
from common.errors import RejectedError, TransportError
from common.events import Begin, Data, End, Stored
from tests.integration.harness import (
    Deployment,
    LoopbackProxy,
    final_files,
    log_text,
    run_agent,
    running_collector,
    stored_files,
    upload_under_way,
)
from tests.integration.loopback import free_port
from tests.integration.mongo_server import NxServer
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

MongoClient = pymongo.MongoClient[dict[str, Any]]
RAW: bson.CodecOptions[RawBSONDocument] = bson.CodecOptions(document_class=RawBSONDocument)
PATIENTS = 100_000
VISITS = 2_000
RESULTS = 500
FUTURE = datetime.datetime(2100, 1, 1)  # TTL-indexed dates must not expire during the test
EXPECTED = {
    "e2e_clinic": {"empty": 0, "patients": PATIENTS, "visits": VISITS},
    "e2e_lab": {"results": RESULTS, "samples": 40},
    "e2e-ward": {"beds": 12},
}


# -- data and helpers ----------------------------------------------------------------------


def visit(i: int) -> dict[str, Any]:
    """A nested document with binary, dates, 64-bit integers, arrays and nulls."""
    return {
        "_id": ObjectId(),
        "patient": i % 997,
        "when": datetime.datetime(2026, 11, 26, 8, 30, 15, (i % 1000) * 1000),
        "expires": FUTURE,
        "scan": Binary(bytes(range(256)) * 2 + i.to_bytes(4, "little")),
        "vitals": {"bp": [120 + i % 7, 80], "notes": {"text": "Ünïcødé ✓", "flag": i % 2 == 0}},
        "billing": Int64(2**40 + i),
        "weight": 70.5 + i / 10,
        "missing": None,
    }


@pytest.fixture(scope="module")
def source(client: MongoClient) -> MongoClient:
    """Three databases: 100k+ documents, nested and binary data, unique and TTL indexes."""
    clinic = client["e2e_clinic"]
    clinic.patients.insert_many(
        (
            {"_id": i, "mrn": f"MRN{i:07d}", "age": i % 100, "name": {"first": f"P{i}"}}
            for i in range(PATIENTS)
        ),
        ordered=False,
    )
    clinic.patients.create_index("mrn", unique=True)
    clinic.visits.insert_many(visit(i) for i in range(VISITS))
    clinic.visits.create_index("expires", expireAfterSeconds=3600)
    clinic.visits.create_index([("patient", 1), ("when", -1)])
    clinic.create_collection("empty")
    lab = client["e2e_lab"]
    lab.results.insert_many(
        {"_id": f"r{i}", "code": f"L{i:05d}", "value": i * 1.5, "ok": i % 3 != 0}
        for i in range(RESULTS)
    )
    lab.samples.insert_many(
        {"_id": ObjectId(), "tube": Binary(os.urandom(64)), "taken": FUTURE, "seq": i}
        for i in range(40)
    )
    lab.samples.create_index("taken", expireAfterSeconds=86_400)
    client["e2e-ward"].beds.insert_many({"_id": i, "room": f"{i // 2}A"} for i in range(12))
    return client


def mongo_source(uri: str, databases: str, *, name: str = "docs", extra: str = "") -> str:
    """A mongodb `[[sources]]` table as an administrator writes it."""
    return (
        textwrap.dedent(f"""
        [[sources]]
        name = "{name}"
        engine = "mongodb"
        uri = "{uri}"
        databases = {databases}
        stall_timeout = 60
    """)
        + extra
    )


def backups_by_database(store: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each stored backup and its manifest, keyed by the real database name."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for manifest_path in store.rglob("*.manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        backup = manifest_path.with_name(manifest_path.name.removesuffix(".manifest.json"))
        assert manifest["database"] not in found, f"two backups of {manifest['database']}"
        found[manifest["database"]] = (backup, manifest)
    return found


def gunzipped(path: Path, size: int = 256 * 1024) -> Iterator[bytes]:
    """The archive inside a stored backup, streamed as `gzip -dc` would."""
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(size):
            yield chunk


def raw_documents(client: MongoClient, db: str, coll: str) -> list[bytes]:
    collection = client[db].get_collection(coll, codec_options=RAW)
    docs = collection.find({}, sort=[("_id", 1)], batch_size=5000)
    return [bytes(cast("RawBSONDocument", doc).raw) for doc in docs]


def index_shapes(client: MongoClient, db: str, coll: str) -> list[tuple[Any, ...]]:
    """Indexes by key and options (nx-27017 renames them, so names are not compared)."""
    shapes = []
    for index in client[db][coll].list_indexes():
        extra = {k: v for k, v in index.items() if k in ("unique", "expireAfterSeconds")}
        shapes.append((list(index["key"].items()), sorted(extra.items())))
    return sorted(shapes, key=repr)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text


# -- the round trip ------------------------------------------------------------------------


async def test_databases_round_trip_through_the_collector_and_the_restorer(
    source: MongoClient, nx_server: NxServer, deployment: Deployment
) -> None:
    """Each database arrives as <db>_<yyyymmdd>.archive.gz and restores document for document."""
    names = json.dumps(sorted(EXPECTED))
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, mongo_source(nx_server.uri, names))
        run = await run_agent(config)
    assert run.returncode == 0, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "3 stored, 0 failed" in run.stdout
    assert "not a point-in-time snapshot" in log_text(deployment.agent_logs)
    assert [p for p in stored_files(deployment.store) if p.name.startswith(".tmp-")] == []
    backups = backups_by_database(deployment.store)
    assert sorted(backups) == sorted(EXPECTED)
    params = MongoParams(nx_server.uri, timeout=5.0, socket_timeout=60.0)
    for database, counts in EXPECTED.items():
        backup, manifest = backups[database]
        check_name_and_checksum(backup, manifest, database)
        check_manifest_facts(manifest, database, counts)
        restored = database.replace("-", "_") + "_restored"
        result = await asyncio.to_thread(restore_archive, params, gunzipped(backup), restored)
        assert result.collections == {f"{restored}.{c}": n for c, n in counts.items()}
        for coll in counts:
            assert raw_documents(source, restored, coll) == raw_documents(source, database, coll)
            assert index_shapes(source, restored, coll) == index_shapes(source, database, coll)
    assert "empty" in source["e2e_clinic_restored"].list_collection_names()


def check_name_and_checksum(backup: Path, manifest: dict[str, Any], database: str) -> None:
    day = datetime.datetime.fromisoformat(manifest["started_at"]).strftime("%Y%m%d")
    assert backup.name == f"{database}_{day}.archive.gz"
    assert backup.parent.parent.name == "db1"
    data = backup.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert manifest["size"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()


def check_manifest_facts(manifest: dict[str, Any], database: str, counts: dict[str, int]) -> None:
    assert manifest["engine"] == "mongodb" and manifest["format"] == "archive"
    assert manifest["compression"] == "gzip" and manifest["source"] == "docs"
    assert manifest["verified"] is True
    dump = manifest["dump"]
    assert dump["point_in_time"] is False
    assert dump["replica_set"] is None
    assert dump["oplog"] is None
    assert re.fullmatch(r"\d+\.\d+\.\d+", dump["server_version"])
    collections = dump["collections"]
    assert {name: c["documents"] for name, c in collections.items()} == counts
    assert {name: c["estimated_documents"] for name, c in collections.items()} == counts
    assert all(c["type"] == "collection" for c in collections.values())
    assert dump["documents"] == sum(counts.values())
    assert manifest["size_estimate"] == sum(c["estimated_bytes"] for c in collections.values())
    assert manifest["size_estimate"] > 0
    verified = manifest["verification"]["collections"]
    assert {ns: c["documents"] for ns, c in verified.items()} == {
        f"{database}.{name}": n for name, n in counts.items()
    }
    assert dump["uncompressed_bytes"] == manifest["verification"]["archive_bytes"]


async def test_all_backs_up_every_database_but_the_system_ones(
    private_nx_server: NxServer, deployment: Deployment
) -> None:
    """`databases = "all"` finds each user database and skips admin, local and config."""
    mongo: MongoClient = pymongo.MongoClient(private_nx_server.uri)
    try:
        mongo["alpha"].things.insert_many({"_id": i} for i in range(5))
        mongo["beta"].things.insert_many({"_id": i, "b": Binary(b"\0" * i)} for i in range(7))
        mongo["admin"].settings.insert_one({"_id": "not a backup"})
    finally:
        mongo.close()
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, mongo_source(private_nx_server.uri, '"all"'))
        run = await run_agent(config)
    assert run.returncode == 0, run.stdout + run.stderr
    backups = backups_by_database(deployment.store)
    assert sorted(backups) == ["alpha", "beta"]
    assert backups["beta"][1]["dump"]["collections"]["things"]["documents"] == 7


# -- failures ------------------------------------------------------------------------------


async def test_server_down_reports_and_leaves_nothing(deployment: Deployment) -> None:
    """Nothing listens: exit 5, one FAILED line, a REPORT logged by the collector, no file."""
    uri = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml("db1", port, mongo_source(uri, '["e2e_clinic"]'))
        run = await run_agent(config)
    assert run.returncode == 5, run.stdout + run.stderr
    no_traceback(run.stderr)
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "docs/e2e_clinic" in failed[0]
    assert "connecting failed on MongoDB at 127.0.0.1" in failed[0]
    assert stored_files(deployment.store) == []
    assert "reports failure (dump) for e2e_clinic" in log_text(deployment.collector_logs)
    assert "failed before the dump started" in log_text(deployment.agent_logs)


async def test_refused_login_reports_without_showing_the_password(
    source: MongoClient, nx_server: NxServer, deployment: Deployment, tmp_path: Path
) -> None:
    """A login the server refuses is reported, and the password appears nowhere."""
    canary = "Wr0ng-canary-Passw0rd"
    secret = tmp_path / "mongo.pass"
    secret.write_text(canary + "\n")
    secret.chmod(0o600)
    extra = f'user = "backup"\npassword_file = "{secret}"\n'
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mongo_source(nx_server.uri, '["e2e_lab"]', extra=extra)
        )
        run = await run_agent(config)
    assert run.returncode == 5, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "FAILED  docs/e2e_lab" in run.stderr
    assert final_files(deployment.store) == []
    assert "reports failure (dump) for e2e_lab" in log_text(deployment.collector_logs)
    for text in (
        run.stdout,
        run.stderr,
        log_text(deployment.collector_logs),
        log_text(deployment.agent_logs),
    ):
        assert canary not in text


async def test_server_killed_mid_dump_aborts_and_leaves_nothing(
    private_nx_server: NxServer, deployment: Deployment
) -> None:
    """The server dies while documents stream: ABORT, exit 5, no file and no temporary."""
    mongo: MongoClient = pymongo.MongoClient(private_nx_server.uri)
    try:
        blob = os.urandom(1 << 20)  # incompressible, so the upload keeps pace with the dump
        mongo["victim"].scans.insert_many(
            (
                {"_id": i, "scan": Binary(blob[(i * 4099) % (1 << 19) :][:4096])}
                for i in range(20_000)
            ),
            ordered=False,
        )
    finally:
        mongo.close()
    async with running_collector(deployment.collector_toml()) as (_, port):
        config = deployment.agent_toml(
            "db1", port, mongo_source(private_nx_server.uri, '["victim"]')
        )
        agent = asyncio.create_task(run_agent(config))
        await wait_for(lambda: upload_under_way(deployment.store, 512 * 1024),
                       "the backup to start streaming")
        private_nx_server.kill()
        run = await agent
    assert run.returncode == 5, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "FAILED  docs/victim" in run.stderr
    assert "dumping 'victim' failed" in run.stderr
    assert stored_files(deployment.store) == []
    collector_log = log_text(deployment.collector_logs)
    assert "agent aborted" in collector_log and "victim" in collector_log
    assert "backup of docs/victim failed" in log_text(deployment.agent_logs)


OP_MSG = 2013
CURSOR_NOT_FOUND = {
    "ok": 0.0,
    "errmsg": "cursor id 1 not found",
    "code": 43,
    "codeName": "CursorNotFound",
}


class CursorProxy(LoopbackProxy):
    """A loopback proxy to a MongoDB server that notes the batch size of each `find` and
    `getMore`, and can answer the n-th getMore with CursorNotFound, as a real server does
    once the cursor was killed (nx-27017 would quietly end the cursor instead)."""

    def __init__(self, target_port: int, kill_get_more: int | None = None) -> None:
        super().__init__(target_port)
        self.kill_get_more = kill_get_more
        self.get_mores = 0
        self.batch_sizes: list[int] = []

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        down = asyncio.create_task(self.copy(up_reader, writer))
        try:
            while True:
                header = await reader.readexactly(16)
                body = await reader.readexactly(int.from_bytes(header[:4], "little") - 16)
                command = self._cursor_command(header, body)
                if command is not None:
                    self.batch_sizes.append(int(command.get("batchSize", 0)))
                if command is not None and "getMore" in command:
                    self.get_mores += 1
                    if self.get_mores == self.kill_get_more:
                        writer.write(self._error_reply(header))
                        await writer.drain()
                        continue
                up_writer.write(header + body)
                await up_writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            down.cancel()
            for w in (writer, up_writer):
                w.transport.abort()

    @staticmethod
    def _cursor_command(header: bytes, body: bytes) -> dict[str, Any] | None:
        """A `find` or `getMore` command, else None.

        OP_MSG: flag bits, then a kind-0 section whose document's first key names the
        command (after the document's int32 length and the element's type byte).
        """
        if int.from_bytes(header[12:16], "little") != OP_MSG or body[4] != 0:
            return None
        if not body[10:].startswith((b"getMore\x00", b"find\x00")):
            return None
        return bson.decode(body[5 : 5 + int.from_bytes(body[5:9], "little")])

    @staticmethod
    def _error_reply(request: bytes) -> bytes:
        payload = b"\x00\x00\x00\x00\x00" + bson.encode(CURSOR_NOT_FOUND)
        header = (16 + len(payload)).to_bytes(4, "little") + b"\x01\x00\x00\x00"
        return header + request[4:8] + OP_MSG.to_bytes(4, "little") + payload


async def test_cursor_killed_mid_dump_aborts_and_leaves_nothing(
    source: MongoClient, nx_server: NxServer, deployment: Deployment
) -> None:
    """The server drops the cursor part-way through a collection: ABORT, exit 5, no file."""
    async with (
        running_collector(deployment.collector_toml()) as (_, port),
        CursorProxy(nx_server.port, kill_get_more=5) as proxy,
    ):
        config = deployment.agent_toml("db1", port, mongo_source(proxy.uri, '["e2e_clinic"]'))
        run = await run_agent(config)
    assert proxy.get_mores == 5
    assert run.returncode == 5, run.stdout + run.stderr
    no_traceback(run.stderr)
    assert "FAILED  docs/e2e_clinic" in run.stderr and "code 43" in run.stderr
    assert stored_files(deployment.store) == []
    collector_log = log_text(deployment.collector_logs)
    assert "agent aborted: dumping 'e2e_clinic' failed" in collector_log


async def test_large_documents_are_read_in_batches_of_about_a_mebibyte(
    client: MongoClient, nx_server: NxServer
) -> None:
    """1000 documents of 16 KB in one reply would cost the agent several copies of 16 MB."""
    scans = client["e2e_scans"].scans
    scans.insert_many({"_id": i, "scan": Binary(os.urandom(16_000))} for i in range(300))
    async with CursorProxy(nx_server.port) as proxy:
        params = MongoParams(proxy.uri, timeout=5.0)
        chunks = []
        async with MongoDump(params, "e2e_scans") as dump:
            async for chunk in dump:
                chunks.append(chunk)
    assert proxy.get_mores >= 4
    assert all(0 < size <= 1024 * 1024 // 16_000 for size in proxy.batch_sizes)
    assert dump.metadata["collections"]["scans"]["documents"] == 300


# -- archives the collector must refuse ----------------------------------------------------


@pytest.fixture(scope="module")
def lab_archive(source: MongoClient, nx_server: NxServer) -> bytes:
    """The uncompressed archive of e2e_lab, made by the agent's own dumper."""

    async def dump() -> bytes:
        params = MongoParams(nx_server.uri, timeout=5.0)
        chunks = []
        async with MongoDump(params, "e2e_lab") as stream:
            async for chunk in stream:
                chunks.append(chunk)
        return b"".join(chunks)

    return asyncio.run(dump())


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def without_last_eof_block(archive: bytes) -> bytes:
    """The archive minus its final EOF header and terminator: a dump cut short."""
    end = len(archive) - 4
    assert archive[end:] == b"\xff\xff\xff\xff"
    for start in range(end - 5, 0, -1):
        if int.from_bytes(archive[start : start + 4], "little") != end - start:
            continue
        header = bson.decode(archive[start:end])
        if header.get("EOF") is True:
            return archive[:start]
    raise AssertionError("no EOF block at the end of the archive")


async def send_raw_backup(
    deployment: Deployment, port: int, database: str, payload: bytes
) -> Stored:
    """Upload ``payload`` as a gzip'd archive over the protocol, with its true SHA-256."""
    config = deployment.agent_toml(
        "db1", port, mongo_source("mongodb://127.0.0.1:1/", f'["{database}"]')
    )
    async with CollectorClient(load_agent_config(config)) as client:
        channel = await client.channel()
        try:
            await channel.send(
                Begin(
                    database=database,
                    engine="mongodb",
                    format="archive",
                    compression="gzip",
                    started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    size_estimate=len(payload),
                    source="docs",
                )
            )
            channel.watch()
            try:
                for start in range(0, len(payload), channel.max_data):
                    channel.check_early_answer()
                    await channel.send(Data(payload[start : start + channel.max_data]))
                await channel.send(End(len(payload), hashlib.sha256(payload).hexdigest(), {}))
            except TransportError:
                pass  # the collector may answer and close before the whole stream is sent
            stored = await channel.expect(Stored, timeout=60)
            assert isinstance(stored, Stored)
            return stored
        finally:
            channel.close()


async def test_collector_stores_the_untouched_archive_sent_raw(
    lab_archive: bytes, deployment: Deployment
) -> None:
    """The raw client is sound: the same archive, unaltered, is stored."""
    payload = gzip_bytes(lab_archive)
    async with running_collector(deployment.collector_toml()) as (_, port):
        stored = await send_raw_backup(deployment, port, "e2e_lab", payload)
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert len(final_files(deployment.store)) == 2  # the backup and its manifest


async def test_collector_rejects_an_archive_with_a_flipped_document_byte(
    lab_archive: bytes, deployment: Deployment
) -> None:
    """Framing and SHA-256 are right, only the namespace CRC is wrong: REJECT integrity."""
    data = bytearray(lab_archive)
    data[data.index(b"L00017")] = ord("l")
    payload = gzip_bytes(bytes(data))
    async with running_collector(deployment.collector_toml()) as (_, port):
        with pytest.raises(RejectedError) as caught:
            await send_raw_backup(deployment, port, "e2e_lab", payload)
    assert caught.value.code == "integrity"
    assert "CRC mismatch for e2e_lab.results" in caught.value.detail
    assert stored_files(deployment.store) == []
    collector_log = log_text(deployment.collector_logs)
    assert "failed (integrity)" in collector_log and "CRC mismatch" in collector_log


async def test_collector_rejects_an_archive_missing_its_last_eof_block(
    lab_archive: bytes, deployment: Deployment
) -> None:
    """A complete gzip stream around an archive cut before its last EOF block is refused."""
    payload = gzip_bytes(without_last_eof_block(lab_archive))
    async with running_collector(deployment.collector_toml()) as (_, port):
        with pytest.raises(RejectedError) as caught:
            await send_raw_backup(deployment, port, "e2e_lab", payload)
    assert caught.value.code == "integrity"
    assert "e2e_lab.samples" in caught.value.detail
    assert stored_files(deployment.store) == []
    assert "failed (integrity)" in log_text(deployment.collector_logs)
