"""Off-site copy of one stored backup: Backhaul against the stock pipeline, same run.

    python bench/offsite.py --size-gb 1 --repeat 2

Starts a throwaway SeaweedFS (tests/integration/seaweed_server.py) with an Object Lock
bucket per round, stores one backup of about N GB (incompressible bytes, as a zstd
dump is) and times, in a balanced order round by round:

  A  backhaul-collector offsite sync (age CLI + multipart upload, Content-MD5, HEAD,
     lock, state on disk), peak RSS of the collector process
  B  age -R recipients < file | python -c boto3 upload_fileobj(stdin)  (the stock
     pipeline: any S3 client uploading from stdin; boto3's managed transfer here)

Prints medians, the ratio A/B and A's peak RSS, and writes JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, date, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests" / "integration")]

from _common import (  # noqa: E402
    balanced_order,
    compile_sources,
    log,
    median,
    mib,
    proc_cpu,
    spawn_and_time,
)
from seaweed_server import ACCESS_KEY, REGION, SECRET_KEY, WeedServer  # noqa: E402

from collector.store.files import Store  # noqa: E402

STOCK_UPLOAD = textwrap.dedent("""
    import sys, boto3
    from botocore.config import Config
    endpoint, bucket, key = sys.argv[1:4]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required",
                      response_checksum_validation="when_required",
                      s3={"addressing_style": "path"}))
    client.upload_fileobj(sys.stdin.buffer, bucket, key)
""")


def make_backup(root: Path, size: int) -> Path:
    store = Store(root)
    store.ensure_root()
    upload = store.begin("db1", "benchdb", "sql.zst")
    sha = hashlib.sha256()
    block = os.urandom(4 * 2**20)
    written = 0
    while written < size:
        chunk = block[: min(len(block), size - written)]
        chunk = hashlib.sha256(written.to_bytes(8, "big")).digest() + chunk[32:]
        upload.write(chunk)
        sha.update(chunk)
        written += len(chunk)
    now = datetime.now(UTC).isoformat()
    stored = upload.commit(date(2026, 11, 26), {
        "manifest_version": 1, "agent": "db1", "database": "benchdb", "engine": "mysql",
        "format": "sql", "compression": "zstd", "size": written, "sha256": sha.hexdigest(),
        "started_at": now, "stored_at": now, "verified": True})
    return stored.path


def write_config(work: Path, store: Path, weed: WeedServer, bucket: str) -> Path:
    secret = work / "s3.secret"
    secret.write_text(SECRET_KEY + "\n")
    secret.chmod(0o600)
    keygen = subprocess.run(["age-keygen", "-o", str(work / f"key-{bucket}")],
                            capture_output=True, check=True)
    del keygen
    public = subprocess.run(["age-keygen", "-y", str(work / f"key-{bucket}")],
                            capture_output=True, check=True).stdout.decode()
    (work / "recipients.txt").write_text(public)
    host_key = work / "host_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                       check=True)
    path = work / "collector.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        listen = "127.0.0.1:0"
        host_key = "{host_key}"
        [storage]
        root = "{store}"
        [log]
        dir = "{work / 'logs'}"
        syslog = false
        [[offsite]]
        name = "bench"
        endpoint = "{weed.endpoint}"
        region = "{REGION}"
        bucket = "{bucket}"
        access_key_id = "{ACCESS_KEY}"
        secret_access_key_file = "{secret}"
        recipients_file = "{work / 'recipients.txt'}"
        lock_mode = "governance"
        lock_days = 1
    """))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of both methods")
    args = parser.parse_args()
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="bench-offsite-"))
    results: dict[str, list[dict[str, float | None]]] = {"A": [], "B": []}
    try:
        with WeedServer(work / "weed") as weed:
            store = work / "store"
            backup = make_backup(store, int(args.size_gb * 2**30))
            log(f"stored {backup.name}: {backup.stat().st_size / 2**20:.0f} MiB")
            collector = shutil.which("backhaul-collector") or "backhaul-collector"
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            stock_env = {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                         "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
            for round_no in range(1, args.repeat * 2 + 1):
                for method in balanced_order(["A", "B"], round_no):
                    bucket = f"bench-{round_no}-{method.lower()}"
                    weed.create_bucket(bucket, object_lock=True)
                    config = write_config(work, store, weed, bucket)
                    for old in store.glob(".offsite-*"):
                        old.unlink()
                    if method == "A":
                        cmd = [collector, "offsite", "sync", "--config", str(config)]
                        run_env = env
                    else:
                        pipe = (f"age -R {work / 'recipients.txt'} < {backup} | "
                                f"{sys.executable} -c '{STOCK_UPLOAD}' {weed.endpoint} "
                                f"{bucket} stock.age")
                        cmd = ["bash", "-o", "pipefail", "-c", pipe]
                        run_env = stock_env
                    weed_pid = weed._process.pid if weed._process else 0
                    weed_before = proc_cpu(weed_pid)[0]
                    with open(work / "out.log", "ab") as out:
                        timed = spawn_and_time(cmd, env=run_env, stdout=out, stderr=out,
                                               sample_children=True)
                    weed_cpu = proc_cpu(weed_pid)[0] - weed_before
                    if timed.returncode != 0:
                        log((work / "out.log").read_text()[-2000:])
                        raise SystemExit(f"method {method} failed ({timed.returncode})")
                    rss = mib(timed.hwm_kib) if method == "A" else mib(timed.ru_maxrss_kib)
                    log(f"round {round_no} {method}: {timed.seconds:.2f} s, "
                        f"CPU {timed.cpu_s:.2f} s (+ SeaweedFS {weed_cpu:.2f} s), "
                        f"peak RSS {rss:.0f} MiB, "
                        f"children {timed.child_hwm_kib}")
                    results[method].append({"seconds": timed.seconds, "rss_mib": rss,
                                            "cpu_s": timed.cpu_s, "server_cpu_s": weed_cpu})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a = median([r["seconds"] or 0.0 for r in results["A"]])
    b = median([r["seconds"] or 0.0 for r in results["B"]])
    peak = max(r["rss_mib"] or 0.0 for r in results["A"])
    assert a is not None and b is not None
    print(f"A backhaul offsite sync  median {a:.2f} s, collector peak RSS {peak:.0f} MiB")
    print(f"B age | boto3 stdin      median {b:.2f} s")
    print(f"ratio A/B {a / b:.3f} (target <= 1.0); RSS bound 150 MiB")
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "offsite.json").write_text(json.dumps(
        {"size_gb": args.size_gb, "results": results, "ratio": a / b, "peak_rss_mib": peak},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
