#!/usr/bin/env python3
"""MongoDB dump benchmark: the agent's archive dump against a raw pymongo read of the same data.

One run starts a throwaway nx-27017 on loopback, fills one database with about
``--size-mb`` MB of documents (two collections: ~2 KB records with nested fields, dates
and a small binary, and ~150-byte events), then times, interleaved over ``--repeat``
rounds, with the agent's cursor batch size everywhere (at most 1000 documents and about
1 MiB, from each collection's average document size; see ``batch_size_for``)::

    R  raw read      find_raw_batches() over every collection          (the floor)
    F  RawBSON find  find() with RawBSONDocument over every collection
    M  MongoDump     the agent's dumper, uncompressed archive bytes, in this process
    P  pipeline      a child process running the agent's MongoAdapter dump through
                     run_pipeline (gzip, SHA-256) into a sink that discards the bytes
    A  agent         `backhaul-agent backup` to a `backhaul-collector serve` on loopback
                     (SSH, the collector's gzip and archive verification, storage)

Rates are BSON document bytes per second, so every method is judged on the same
bytes; ratios are against R (target >= 0.8). The peak RSS of P's child and of the real
agent is their VmHWM, sampled from /proc until they exit (target < 80 MiB); ``wait4``'s
``ru_maxrss`` is kept in the JSON only, as Linux folds the parent's peak into it when
the child is spawned with vfork. P's rate uses the time the child measured around the
pipeline; A's uses the duration the agent prints for the backup (preflight, stream and
the collector's verdict). "nx CPU s" is the server's CPU time during each method, "CPU s"
that of P's child or of the agent. On a machine with few cores the server, the agent and
anything else running compete for CPU, so the load average is printed with the results.

Usage::

    python bench/mongo_dump.py --size-mb 256 --repeat 3
    python bench/mongo_dump.py --size-mb 32 --repeat 1 --methods RMP   # a quick run
    python bench/mongo_dump.py --gzip-level 1                          # cheaper gzip

Needs nx-27017 (a dev dependency) and ssh-keygen. Results go to stdout and to
``bench/out/mongo_dump-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

# Run as a script, this folder is already on sys.path; imported by path, it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    OUT_DIR,
    REPO,
    BenchError,
    Timed,
    agent_toml,
    balanced_order,
    collector_toml,
    compile_sources,
    fmt,
    free_port,
    log,
    machine_info,
    median,
    proc_cpu,
    spawn_and_time,
    stop_process,
    wait_for_ssh_banner,
)

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATABASE = "bench"
AGENT_NAME = "bench"
TARGET_RATIO = 0.8
TARGET_RSS_MIB = 80.0
METHODS = {
    "R": "raw read (find_raw_batches)",
    "F": "find() as RawBSONDocument",
    "M": "MongoDump (archive, uncompressed)",
    "P": "pipeline (dump+gzip+sha256, discard)",
    "A": "agent -> collector (gzip, SSH)",
}


# -- the data ------------------------------------------------------------------------------

VOCABULARY = (
    "patient admitted stable fever cough blood pressure normal review follow-up discharged "
    "ward night nurse doctor allergy penicillin none reported chest x-ray clear mild pain "
    "oral dose daily twice morning evening saline infusion observed resting"
)
WORDS = tuple(VOCABULARY.split())


def record(i: int, rng: random.Random, blob: bytes) -> dict[str, Any]:
    """About 2 KB: text, a nested document, an array, dates, numbers and a binary."""
    from bson.binary import Binary
    from bson.int64 import Int64

    start = rng.randrange(len(blob) - 256)
    return {
        "_id": i,
        "mrn": f"MRN{i:09d}",
        "admitted": dt.datetime(2020, 1, 1) + dt.timedelta(minutes=i),
        "ward": f"W{i % 40:02d}",
        "vitals": {
            "bp": [110 + i % 30, 70 + i % 20],
            "pulse": 60 + i % 40,
            "temp": 36.5 + (i % 30) / 10,
        },
        "codes": [f"ICD{rng.randrange(10_000):04d}" for _ in range(6)],
        "notes": " ".join(rng.choices(WORDS, k=220)),
        "billing": Int64(10**12 + i),
        "scan": Binary(blob[start : start + 256]),
    }


def event(i: int) -> dict[str, Any]:
    """About 150 bytes: many small documents stress per-document costs."""
    return {
        "_id": i,
        "kind": "vitals" if i % 3 else "note",
        "at": dt.datetime(2026, 1, 1),
        "ward": f"W{i % 40:02d}",
        "value": i * 0.25,
        "ok": i % 7 != 0,
        "by": f"u{i % 500}",
    }


def batched(docs: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def fill(uri: str, size_mb: float) -> dict[str, Any]:
    """80% of the bytes in records, 20% in events; returns what was written."""
    import pymongo

    started = time.monotonic()
    rng = random.Random(27017)
    blob = rng.randbytes(1 << 20)
    records = max(1, int(size_mb * 1e6 * 0.8 / 2000))
    events = max(1, int(size_mb * 1e6 * 0.2 / 150))
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    try:
        db = client[DATABASE]
        for batch in batched((record(i, rng, blob) for i in range(records)), 2000):
            db.records.insert_many(batch, ordered=False)
        for batch in batched((event(i) for i in range(events)), 5000):
            db.events.insert_many(batch, ordered=False)
        db.records.create_index("mrn", unique=True)
        db.events.create_index("at", expireAfterSeconds=10**9)
        sizes = batch_sizes(db)
    finally:
        client.close()
    return {
        "database": DATABASE,
        "records": records,
        "events": events,
        "batch_sizes": sizes,
        "fill_seconds": round(time.monotonic() - started, 1),
    }


# -- the in-process methods ----------------------------------------------------------------


def batch_sizes(db: Any) -> dict[str, int]:
    """Each collection's cursor batch size, chosen as the agent's dumper chooses it."""
    from agent.engines.mongo_dump import batch_size_for

    sizes = {}
    for name in sorted(db.list_collection_names()):
        stats = db.command("collStats", name)
        sizes[name] = batch_size_for(int(stats.get("count", 0)), int(stats.get("size", 0)))
    return sizes


def read_raw_batches(uri: str) -> tuple[int, int]:
    """(documents, bytes) read with find_raw_batches over every collection."""
    import pymongo

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    documents = size = 0
    try:
        db = client[DATABASE]
        for name, batch_size in batch_sizes(db).items():
            for batch in db[name].find_raw_batches({}, batch_size=batch_size):
                size += len(batch)
            documents += db[name].estimated_document_count()
    finally:
        client.close()
    return documents, size


def read_rawbson(uri: str) -> tuple[int, int]:
    """(documents, bytes) read with find() decoding to RawBSONDocument."""
    import pymongo
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument

    options: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    documents = size = 0
    try:
        db = client[DATABASE]
        for name, batch_size in batch_sizes(db).items():
            collection = db.get_collection(name, codec_options=options)
            for doc in collection.find({}, batch_size=batch_size):
                documents += 1
                size += len(cast("RawBSONDocument", doc).raw)
    finally:
        client.close()
    return documents, size


def run_mongodump(uri: str) -> tuple[int, int, int]:
    """(documents, document bytes, archive bytes) of the agent's dumper, consumed here."""
    from agent.engines.mongo_connect import MongoParams
    from agent.engines.mongo_dump import MongoDump

    async def consume() -> tuple[int, int, int]:
        archive = 0
        params = MongoParams(uri, timeout=10.0)
        async with MongoDump(params, DATABASE) as dump:
            async for chunk in dump:
                archive += len(chunk)
        meta = dump.metadata
        return int(meta["documents"]), int(meta["document_bytes"]), archive

    return asyncio.run(consume())


# -- the child process for P ---------------------------------------------------------------


def child_pipeline(uri: str, level: int | None) -> None:
    """Run the agent's dump path into a discarding sink; print one JSON line."""
    import agent.runner  # noqa: F401  -- load what the agent loads, for a fair RSS
    from agent.config import SourceConfig
    from agent.engines.adapters import MongoAdapter
    from agent.stream.stages import run_pipeline
    from common.compression import make_compressor

    source = SourceConfig(
        name="bench",
        engine="mongodb",
        databases=(DATABASE,),
        uri=uri,
        compression="gzip",
        compression_level=level,
    )
    adapter = MongoAdapter(source)

    async def discard(data: bytes) -> None:
        await asyncio.sleep(0)

    async def main() -> dict[str, Any]:
        await adapter.preflight(DATABASE)
        started = time.perf_counter()
        async with adapter.dump(DATABASE) as dump:
            compressor = make_compressor("gzip", source.compression_level)
            result = await run_pipeline(aiter(dump), compressor, discard)
            meta = adapter.dump_metadata(dump)
        return {
            "seconds": time.perf_counter() - started,
            "archive_bytes": result.raw_bytes,
            "gzip_bytes": result.byte_count,
            "documents": meta["documents"],
            "document_bytes": meta["document_bytes"],
        }

    print(json.dumps(asyncio.run(main())), flush=True)


@dataclass
class Child:
    """A finished child process and what it printed."""

    timed: Timed
    stdout: str
    stderr: str


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> Child:
    """Run ``cmd`` to its end, sampling its VmHWM; wall time, output, peak memory."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        timed = spawn_and_time(cmd, env=env, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        return Child(timed, out.read().decode(), err.read().decode())


# -- the real agent and collector for A ----------------------------------------------------


class Deployment:
    """Keys, configs and a `backhaul-collector serve` process in a temporary folder."""

    def __init__(self, root: Path, uri: str, level: int | None) -> None:
        from tests.integration.harness import ssh_keygen

        keys = root / "keys"
        keys.mkdir()
        host_key = ssh_keygen(keys / "collector_host_key", "bench-collector")
        agent_key = ssh_keygen(keys / "agent_bench", "bench-agent")
        self.store = root / "store"
        self.port = free_port()
        self.collector_config = root / "collector.toml"
        self.collector_config.write_text(
            collector_toml(
                port=self.port,
                host_key=host_key,
                store=self.store,
                log_dir=root / "collector-logs",
                agent=AGENT_NAME,
                agent_key=agent_key,
            )
        )
        self.agent_config = root / "agent.toml"
        head = agent_toml(
            port=self.port,
            host_key=host_key,
            client_key=agent_key,
            log_dir=root / "agent-logs",
            agent=AGENT_NAME,
        )
        self.agent_config.write_text(
            head
            + textwrap.dedent(f"""
            [[sources]]
            name = "nx"
            engine = "mongodb"
            uri = "{uri}"
            databases = ["{DATABASE}"]
            """)
        )
        if level is not None:
            with self.agent_config.open("a") as config:
                config.write(f"compression_level = {level}\n")
        self.collector: subprocess.Popen[bytes] | None = None
        self.collector_stderr = root / "collector.stderr"

    def start(self) -> None:
        with self.collector_stderr.open("wb") as err:
            self.collector = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "collector.cli",
                    "serve",
                    "--config",
                    str(self.collector_config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO,
            )
        try:
            wait_for_ssh_banner(self.port, self.collector, "the collector")
        except BenchError as exc:
            raise BenchError(f"{exc}: {self.collector_stderr.read_text()}") from None

    def backup(self) -> Child:
        child = spawn(
            [sys.executable, "-m", "agent.cli", "backup", "--config", str(self.agent_config)],
            env=_env(),
        )
        if child.timed.returncode != 0:
            raise BenchError(f"backhaul-agent failed ({child.timed.returncode}): {child.stderr}")
        for path in list(self.store.rglob("*")):  # keep the disk and the names clean
            if path.is_file():
                path.unlink()
        return child

    def stop(self) -> None:
        stop_process(self.collector)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def agent_seconds(stdout: str) -> float:
    """The duration the agent prints on its `ok` line: `(..., 12.3 s)`."""
    for line in stdout.splitlines():
        if line.startswith("ok "):
            return float(line.rsplit(", ", 1)[1].removesuffix(" s)"))
    raise BenchError(f"no `ok` line in the agent's output: {stdout!r}")


# -- orchestration -------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    round: int
    seconds: float
    documents: int
    document_bytes: int
    archive_bytes: int | None = None
    gzip_bytes: int | None = None
    wall_seconds: float | None = None
    ru_maxrss_kib: int | None = None
    hwm_kib: int | None = None
    cpu_s: float | None = None
    server_cpu_s: float | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="backhaul-mongo-bench-"))
        self.runs: list[Run] = []
        self.server: Any = None
        self.deployment: Deployment | None = None
        self.dataset: dict[str, Any] = {}

    def start(self) -> None:
        from tests.integration.mongo_server import NxServer

        self.server = NxServer(self.tmp / "nx")
        self.server.start()
        log(f"nx-27017 on {self.server.uri}; filling about {self.args.size_mb:.0f} MB")
        self.dataset = fill(self.server.uri, self.args.size_mb)
        if "A" in self.args.methods:
            self.deployment = Deployment(self.tmp, self.server.uri, self.args.gzip_level)
            self.deployment.start()

    def measure(self, method: str, round_no: int) -> Run:
        server_cpu = proc_cpu(self.server._process.pid)[0]
        run = self._measure(method, round_no, self.server.uri)
        run.server_cpu_s = proc_cpu(self.server._process.pid)[0] - server_cpu
        return run

    def _measure(self, method: str, round_no: int, uri: str) -> Run:
        if method in "RFM":
            readers: dict[str, Callable[[str], tuple[int, ...]]] = {
                "R": read_raw_batches,
                "F": read_rawbson,
                "M": run_mongodump,
            }
            started = time.perf_counter()
            found = readers[method](uri)
            seconds = time.perf_counter() - started
            archive = found[2] if method == "M" else None
            return Run(method, round_no, seconds, found[0], found[1], archive_bytes=archive)
        if method == "P":
            level = (
                [] if self.args.gzip_level is None else ["--gzip-level", str(self.args.gzip_level)]
            )
            child = spawn(
                [sys.executable, str(Path(__file__).resolve()), "--child-pipeline", uri, *level],
                env=_env(),
            )
            if child.timed.returncode != 0:
                raise BenchError(f"the pipeline child failed: {child.stderr[-2000:]}")
            facts = json.loads(child.stdout.splitlines()[-1])
            return Run(
                method,
                round_no,
                facts["seconds"],
                facts["documents"],
                facts["document_bytes"],
                facts["archive_bytes"],
                facts["gzip_bytes"],
                child.timed.seconds,
                child.timed.ru_maxrss_kib,
                child.timed.hwm_kib,
                child.timed.cpu_s,
            )
        assert self.deployment is not None
        child = self.deployment.backup()
        return Run(
            method,
            round_no,
            agent_seconds(child.stdout),
            self.reference_documents(),
            self.reference_bytes(),
            wall_seconds=child.timed.seconds,
            ru_maxrss_kib=child.timed.ru_maxrss_kib,
            hwm_kib=child.timed.hwm_kib,
            cpu_s=child.timed.cpu_s,
        )

    def reference_documents(self) -> int:
        return next(r.documents for r in self.runs if r.method in "FMP")

    def reference_bytes(self) -> int:
        return next(r.document_bytes for r in self.runs if r.method in "RFMP")

    def run(self) -> dict[str, Any]:
        compile_sources()
        self.start()
        order = [m for m in "RFMPA" if m in self.args.methods]
        read_raw_batches(self.server.uri)  # warm nx's caches, untimed
        load_before = os.getloadavg()
        for round_no in range(1, self.args.repeat + 1):
            for method in balanced_order(order, round_no):
                run = self.measure(method, round_no)
                self.runs.append(run)
                rate = run.document_bytes / run.seconds / 1e6
                memory = f", peak RSS {run.hwm_kib / 1024:.1f} MiB" if run.hwm_kib else ""
                log(
                    f"round {round_no}: {method} {METHODS[method]}: {run.seconds:.2f} s, "
                    f"{rate:.1f} MB/s{memory}"
                )
        return self.result(load_before)

    def result(self, load_before: tuple[float, float, float]) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for method in METHODS:
            runs = [r for r in self.runs if r.method == method]
            if not runs:
                continue
            rates = [r.document_bytes / r.seconds / 1e6 for r in runs]
            cpus = [r.cpu_s for r in runs if r.cpu_s is not None]
            summary[method] = {
                "label": METHODS[method],
                "median_s": statistics.median(r.seconds for r in runs),
                "median_mb_per_s": statistics.median(rates),
                "min_mb_per_s": min(rates),
                "max_mb_per_s": max(rates),
                "document_bytes": runs[0].document_bytes,
                "archive_bytes": runs[0].archive_bytes,
                "gzip_bytes": runs[0].gzip_bytes,
                "peak_rss_mib": max((r.hwm_kib or 0) / 1024 for r in runs) or None,
                "median_cpu_s": median(cpus),
                "ru_maxrss_mib": max((r.ru_maxrss_kib or 0) / 1024 for r in runs) or None,
                "median_server_cpu_s": statistics.median(r.server_cpu_s or 0 for r in runs),
            }
        ratios = {}
        if "R" in summary:
            floor = summary["R"]["median_mb_per_s"]
            ratios = {
                f"{m}/R": s["median_mb_per_s"] / floor for m, s in summary.items() if m != "R"
            }
        targets = [
            {
                "name": f"{key} throughput ratio",
                "value": value,
                "limit": f">= {TARGET_RATIO}",
                "pass": value >= TARGET_RATIO,
            }
            for key, value in ratios.items()
            if key in ("M/R", "P/R")
        ]
        for method in ("P", "A"):
            peak = summary.get(method, {}).get("peak_rss_mib")
            if peak:
                targets.append(
                    {
                        "name": f"{method} peak RSS (MiB, max over runs)",
                        "value": peak,
                        "limit": f"< {TARGET_RSS_MIB}",
                        "pass": peak < TARGET_RSS_MIB,
                    }
                )
        return {
            "benchmark": "mongo_dump",
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "args": {
                "size_mb": self.args.size_mb,
                "repeat": self.args.repeat,
                "methods": self.args.methods,
                "gzip_level": self.args.gzip_level,
            },
            "machine": machine_info(load_before),
            "dataset": self.dataset,
            "summary": summary,
            "ratios": ratios,
            "targets": targets,
            "runs": [asdict(r) for r in self.runs],
        }

    def close(self) -> None:
        if self.deployment is not None:
            self.deployment.stop()
        if self.server is not None:
            self.server.stop()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def print_report(result: dict[str, Any]) -> None:
    data = result["dataset"]
    first = next(iter(result["summary"].values()))
    print(
        f"\nMongoDB dump on nx-27017: {data['records']} records + {data['events']} events, "
        f"{first['document_bytes'] / 1e6:.1f} MB of BSON; batch sizes "
        f"{data['batch_sizes']}; medians of {result['args']['repeat']} round(s); "
        f"{result['machine']['cpus']} CPU(s), load average "
        f"{result['machine']['loadavg_before'][0]:.1f} before, "
        f"{result['machine']['loadavg_after'][0]:.1f} after"
    )
    print(
        f"{'method':<44}{'median s':>9}{'MB/s':>8}{'min':>7}{'max':>7}{'nx CPU s':>9}"
        f"{'CPU s':>7}{'peak RSS':>10}"
    )
    for method, row in result["summary"].items():
        peak = f"{row['peak_rss_mib']:.1f} MiB" if row["peak_rss_mib"] else "-"
        cpu = fmt(row["median_cpu_s"], ".1f")
        print(
            f"{method + ' ' + row['label']:<44}{row['median_s']:>9.2f}"
            f"{row['median_mb_per_s']:>8.1f}{row['min_mb_per_s']:>7.1f}"
            f"{row['max_mb_per_s']:>7.1f}{row['median_server_cpu_s']:>9.1f}{cpu:>7}{peak:>10}"
        )
    sizes = result["summary"].get("P") or result["summary"].get("M")
    if sizes and sizes.get("archive_bytes"):
        gz = sizes.get("gzip_bytes")
        print(
            f"archive {sizes['archive_bytes'] / 1e6:.1f} MB"
            + (f", gzip {gz / 1e6:.1f} MB ({sizes['archive_bytes'] / gz:.2f}x)" if gz else "")
        )
    if result["ratios"]:
        print(
            "throughput ratios vs R: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items())
        )
    for target in result["targets"]:
        verdict = "PASS" if target["pass"] else "FAIL"
        print(f"target {target['name']}: {target['value']:.2f} ({target['limit']}) {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=256, help="data to generate (MB)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians are printed)")
    parser.add_argument("--methods", default="RFMPA", help="subset of RFMPA")
    parser.add_argument(
        "--gzip-level",
        type=int,
        choices=range(1, 10),
        metavar="1-9",
        help="gzip level for P and A (default: the agent's, 6)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child-pipeline", metavar="URI", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_pipeline is None and (not args.methods or set(args.methods) - set(METHODS)):
        parser.error(f"--methods takes letters of {''.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_pipeline is not None:
        child_pipeline(args.child_pipeline, args.gzip_level)
        return 0
    bench = Bench(args)
    try:
        result = bench.run()
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        bench.close()
    print_report(result)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = OUT_DIR / f"mongo_dump-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
