"""Off-site copies against a real SeaweedFS S3 endpoint and the stock `age` CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from botocore.exceptions import ClientError
from harness import CuttingProxy, Deployment, agent_env
from mariadb_server import MariaDBServer
from seaweed_server import ACCESS_KEY, REGION, SECRET_KEY, WeedServer

from collector.cli import main as collector_main
from collector.config import CollectorConfig, load_collector_config
from collector.offsite import copier as copier_module
from collector.offsite import state
from collector.offsite.copier import Copier
from collector.store.files import Store, StoredBackup
from common.errors import ConfigError, ExitCode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    with WeedServer(tmp_path_factory.mktemp("weed")) as server:
        yield server


_buckets = iter(range(1000))


@pytest.fixture
def bucket(weed: WeedServer) -> str:
    """A fresh Object Lock bucket for one test."""
    name = f"locked-{next(_buckets)}-{os.getpid()}"
    weed.create_bucket(name, object_lock=True)
    return name


def age_key(path: Path) -> str:
    """A key made by `age-keygen`, as an administrator would; returns its public key."""
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    out = subprocess.run(["age-keygen", "-y", str(path)], check=True, capture_output=True)
    return out.stdout.decode().strip()


def stock_age_decrypt(ciphertext: bytes, identity: Path) -> bytes:
    """`age -d -i identity`, the stock CLI, as an administrator runs it."""
    return subprocess.run(["age", "-d", "-i", str(identity)], input=ciphertext,
                          check=True, capture_output=True).stdout


class Site:
    """A collector configuration with one [[offsite]] target and two admins' age keys."""

    def __init__(self, deployment: Deployment, weed: WeedServer, bucket: str, *,
                 secret: str = SECRET_KEY, lock: bool = True, endpoint: str = "") -> None:
        self.root = deployment.root
        self.identities = [self.root / "admin1.key", self.root / "admin2.key"]
        recipients = [age_key(p) for p in self.identities]
        self.recipients = self.root / "recipients.txt"
        self.recipients.write_text("# two administrators\n" + "\n".join(recipients) + "\n")
        secret_file = self.root / "s3.secret"
        secret_file.write_text(secret + "\n")
        secret_file.chmod(0o600)
        lock_lines = 'lock_mode = "compliance"\nlock_days = 2\n' if lock else ""
        offsite = textwrap.dedent(f"""
            [[offsite]]
            name = "weed"
            endpoint = "{endpoint or weed.endpoint}"
            region = "{REGION}"
            bucket = "{bucket}"
            prefix = "backhaul/"
            access_key_id = "{ACCESS_KEY}"
            secret_access_key_file = "{secret_file}"
            recipients_file = "{self.recipients}"
            part_size_mib = 5
        """) + lock_lines
        self.config_path = deployment.collector_toml(extra=offsite)
        self.config: CollectorConfig = load_collector_config(self.config_path)
        self.store_root = self.config.storage.root
        self.weed = weed
        self.bucket = bucket

    def store_backup(self, database: str, size: int = 7 * 2**20,
                     agent: str = "db1") -> tuple[StoredBackup, bytes]:
        """Store a whole zstd SQL dump the way ingest does; returns it and its plaintext."""
        rows = b"".join(b"INSERT INTO t VALUES (%d, '%s');\n" % (i, os.urandom(24).hex().encode())
                        for i in range(size // 70))
        sql = b"-- MariaDB dump\n" + rows + b"-- Dump completed on 2026-11-26\n"
        data = zstandard.ZstdCompressor(level=1).compress(sql)
        store = Store(self.store_root)
        store.ensure_root()
        upload = store.begin(agent, database, "sql.zst")
        upload.write(data)
        now = datetime.now(UTC).isoformat()
        manifest = {"manifest_version": 1, "agent": agent, "database": database,
                    "engine": "mysql", "format": "sql", "compression": "zstd",
                    "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "started_at": now, "stored_at": now, "verified": True}
        return upload.commit(date(2026, 11, 26), manifest), sql

    def run(self, *argv: str) -> int:
        return collector_main([*argv, "--config", str(self.config_path)])

    def recover(self, identity: int) -> int:
        """`recover --from weed` with one administrator's key."""
        return collector_main(["recover", "--config", str(self.config_path), "--from", "weed",
                               "--identity", str(self.identities[identity])])

    def object_key(self, backup: StoredBackup) -> str:
        return "backhaul/" + backup.path.relative_to(self.store_root).as_posix() + ".age"


@pytest.fixture
def site(deployment: Deployment, weed: WeedServer, bucket: str) -> Site:
    return Site(deployment, weed, bucket)


def test_sync_copies_and_recover_rebuilds_a_lost_store_byte_identical(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    """Copy two backups, lose the store, recover it: same bytes, same names, same manifests."""
    first, _ = site.store_backup("hospital")
    second, _ = site.store_backup("sp ace", size=100_000)
    originals = {b.path: b.path.read_bytes() for b in (first, second)}
    assert site.run("offsite", "sync") == ExitCode.OK
    assert len(state.load(site.store_root, "weed").copied) == 2
    for backup in (first, second):
        _prune_locally(backup)
    capsys.readouterr()
    code = site.recover(1)
    out = capsys.readouterr().out
    assert code == ExitCode.OK, out
    assert "2 recovered, 0 skipped, 0 failed" in out
    for path, content in originals.items():
        assert path.read_bytes() == content
        manifest = json.loads((path.parent / (path.name + ".manifest.json")).read_text())
        assert manifest["recovered_from"] == "weed"


def test_stock_age_and_zstd_restore_the_dump_with_either_recipient_key(site: Site) -> None:
    """Without Backhaul: any S3 client, `age -d -i key`, `zstd -dc` give the dump back."""
    backup, sql = site.store_backup("hospital")
    assert site.run("offsite", "sync") == ExitCode.OK
    ciphertext = site.weed.client().get_object(
        Bucket=site.bucket, Key=site.object_key(backup))["Body"].read()
    assert ciphertext.startswith(b"age-encryption.org/v1\n")
    for identity in site.identities:
        plain = stock_age_decrypt(ciphertext, identity)
        dump = subprocess.run(["zstd", "-dc"], input=plain, check=True,
                              capture_output=True).stdout
        assert dump == sql


def test_cloud_manifest_names_both_hashes_the_recipients_and_the_lock(site: Site) -> None:
    backup, _ = site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    key = site.object_key(backup).removesuffix(".age") + ".manifest.json"
    cloud = json.loads(site.weed.client().get_object(Bucket=site.bucket, Key=key)["Body"].read())
    assert cloud["plaintext_sha256"] == backup.manifest["sha256"]
    assert len(cloud["ciphertext_sha256"]) == 64
    assert len(cloud["recipients"]) == 2
    assert cloud["lock"]["mode"] == "compliance"
    head = site.weed.client().head_object(Bucket=site.bucket, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"


def test_server_refuses_to_delete_a_copied_backup_under_lock(site: Site) -> None:
    """The lock is real: the storage itself refuses the delete of the locked version."""
    backup, _ = site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    client = site.weed.client()
    head = client.head_object(Bucket=site.bucket, Key=site.object_key(backup))
    with pytest.raises(ClientError) as refused:
        client.delete_object(Bucket=site.bucket, Key=site.object_key(backup),
                             VersionId=head["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert client.head_object(Bucket=site.bucket, Key=site.object_key(backup))["ContentLength"]


def test_a_second_sync_copies_nothing_again(site: Site,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    capsys.readouterr()
    assert site.run("offsite", "sync") == ExitCode.OK
    assert "0 backup(s) copied" in capsys.readouterr().out


def test_check_config_reaches_each_target_and_says_so(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.run("check-config") == ExitCode.OK
    assert f"offsite weed: {site.weed.endpoint} bucket {site.bucket} (compliance 2 d): " \
        "reachable" in capsys.readouterr().out


def test_lock_on_a_bucket_without_object_lock_is_refused_at_check_config(
        deployment: Deployment, weed: WeedServer, capsys: pytest.CaptureFixture[str]) -> None:
    weed.create_bucket("plain-bucket", object_lock=False)
    site = Site(deployment, weed, "plain-bucket")
    assert site.run("check-config") == ExitCode.CONFIG
    assert "has no Object Lock" in capsys.readouterr().err


def test_wrong_secret_is_a_clear_error_and_leaves_local_backups_alone(
        deployment: Deployment, weed: WeedServer, bucket: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(deployment, weed, bucket, secret="not-the-secret")
    backup, _ = site.store_backup("hospital", size=50_000)
    before = backup.path.read_bytes()
    assert site.run("offsite", "sync") == ExitCode.STORAGE
    out = capsys.readouterr().out
    assert "access denied" in out.lower() or "wrong secret" in out.lower()
    assert "not-the-secret" not in out
    logs = "".join(p.read_text() for p in deployment.collector_logs.glob("*.log"))
    assert "access denied" in logs.lower() and "not-the-secret" not in logs
    recorded = state.load(site.store_root, "weed")
    assert recorded.failures_in_a_row == 1 and not recorded.copied
    assert backup.path.read_bytes() == before
    site.run("offsite", "status")
    assert "1 pending" in capsys.readouterr().out


def test_missing_bucket_is_a_clear_error(deployment: Deployment, weed: WeedServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(deployment, weed, "no-such-bucket", lock=False)
    site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.STORAGE
    assert "the bucket does not exist" in capsys.readouterr().out


def test_recover_refuses_a_tampered_object_and_stores_nothing(
        deployment: Deployment, weed: WeedServer, capsys: pytest.CaptureFixture[str]) -> None:
    weed.create_bucket("tamper-bucket", object_lock=False)
    site = Site(deployment, weed, "tamper-bucket", lock=False)
    backup, _ = site.store_backup("hospital", size=200_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    client = weed.client()
    key = site.object_key(backup)
    body = bytearray(client.get_object(Bucket="tamper-bucket", Key=key)["Body"].read())
    body[-100] ^= 1
    client.put_object(Bucket="tamper-bucket", Key=key, Body=bytes(body))
    os.chmod(backup.path, 0o600)
    backup.path.unlink()
    capsys.readouterr()
    code = site.recover(0)
    out = capsys.readouterr().out
    assert code == ExitCode.INTEGRITY, out
    assert "FAILED" in out
    assert not backup.path.exists()
    assert not [p for p in backup.path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_recover_skips_a_backup_already_in_the_store(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    backup, _ = site.store_backup("hospital", size=50_000)
    before = backup.path.stat()
    assert site.run("offsite", "sync") == ExitCode.OK
    capsys.readouterr()
    code = site.recover(0)
    out = capsys.readouterr().out
    assert code == ExitCode.OK
    assert "already in the local store" in out and "0 recovered, 1 skipped" in out
    assert backup.path.stat().st_ino == before.st_ino


async def test_copier_retries_a_target_that_is_down_and_copies_once_it_is_back(
        deployment: Deployment, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Down at the start: the error is recorded; back up: the backup is copied, once."""
    monkeypatch.setattr(copier_module, "FIRST_BACKOFF", 0.5)
    own = WeedServer(tmp_path_factory.mktemp("weed-down"))
    own.start()
    own.create_bucket("come-back", object_lock=True)
    own.stop()
    site = Site(deployment, own, "come-back")
    backup, _ = site.store_backup("hospital", size=50_000)
    copier = Copier(site.config.offsite, site.store_root)
    copier.start()
    try:
        await _until(lambda: state.load(site.store_root, "weed").failures_in_a_row >= 1)
        assert not state.load(site.store_root, "weed").copied
        await asyncio.to_thread(own.start)
        await _until(lambda: bool(state.load(site.store_root, "weed").copied), timeout=60)
    finally:
        await copier.close()
    versions = own.client().list_object_versions(Bucket="come-back",
                                                 Prefix=site.object_key(backup))
    assert len(versions.get("Versions", [])) == 1
    own.stop()


async def _until(check: object, timeout: float = 30.0) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.2)


async def test_serve_copies_stored_backups_in_the_background(site: Site) -> None:
    """`serve` starts the copier: a backup already stored is copied without any command."""
    from harness import running_collector

    backup, _ = site.store_backup("hospital", size=50_000)
    async with running_collector(site.config_path):
        await _until(lambda: bool(state.load(site.store_root, "weed").copied), timeout=60)
    head = site.weed.client().head_object(Bucket=site.bucket, Key=site.object_key(backup))
    assert head["ObjectLockMode"] == "COMPLIANCE"


async def test_serve_refuses_to_start_when_the_locked_target_has_no_object_lock(
        deployment: Deployment, weed: WeedServer) -> None:
    from harness import running_collector

    weed.create_bucket("plain-for-serve", object_lock=False)
    site = Site(deployment, weed, "plain-for-serve")
    with pytest.raises(ConfigError, match="has no Object Lock"):
        async with running_collector(site.config_path):
            pass


async def test_connection_cut_mid_upload_leaves_nothing_visible_and_retry_copies_once(
        deployment: Deployment, weed: WeedServer, bucket: str) -> None:
    """Cut mid-part: the upload is aborted, no object shows; once mended, one copy."""
    async with CuttingProxy(weed.s3_port, limit=2 * 2**20) as proxy:
        site = Site(deployment, weed, bucket, endpoint=f"http://127.0.0.1:{proxy.port}")
        backup, _ = site.store_backup("hospital", size=16 * 2**20)
        assert await asyncio.to_thread(site.run, "offsite", "sync") == ExitCode.STORAGE
        client = weed.client()
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert "Versions" not in client.list_object_versions(Bucket=bucket)
        assert not state.load(site.store_root, "weed").copied
        proxy.limit = None
        assert await asyncio.to_thread(site.run, "offsite", "sync") == ExitCode.OK
    versions = client.list_object_versions(Bucket=bucket, Prefix=site.object_key(backup))
    assert len(versions["Versions"]) == 1


def test_collector_killed_mid_upload_copies_again_after_restart_exactly_once(
        site: Site) -> None:
    """kill -9 between parts: no object under the key; the next run copies it whole, once;
    the sweep aborts the orphan upload once it is old."""
    backup, sql = site.store_backup("hospital", size=24 * 2**20)
    slow = site.config_path.read_text() + 'max_rate = "2MiB/s"\n'
    site.config_path.write_text(slow)
    client = site.weed.client()
    process = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "offsite", "sync", "--config",
         str(site.config_path)], env=agent_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not client.list_multipart_uploads(Bucket=site.bucket).get("Uploads"):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        time.sleep(1.0)  # into the upload, between parts
    finally:
        process.kill()
        process.wait()
    assert "Versions" not in client.list_object_versions(Bucket=site.bucket)
    site.config_path.write_text(slow.replace('max_rate = "2MiB/s"\n', ""))
    assert site.run("offsite", "sync") == ExitCode.OK
    versions = client.list_object_versions(Bucket=site.bucket, Prefix=site.object_key(backup))
    assert len(versions["Versions"]) == 1
    from collector.offsite.bucket import Bucket

    later = datetime.now(UTC) + timedelta(days=2)
    assert Bucket(load_collector_config(site.config_path).offsite[0]) \
        .abort_stale_uploads(later) == 1
    assert not client.list_multipart_uploads(Bucket=site.bucket).get("Uploads")
    ciphertext = client.get_object(Bucket=site.bucket, Key=site.object_key(backup))["Body"].read()
    plain = stock_age_decrypt(ciphertext, site.identities[0])
    assert zstandard.ZstdDecompressor().decompressobj().decompress(plain) == sql


def _prune_locally(backup: StoredBackup) -> None:
    """What `prune` does to a backup past retention: data file and manifest removed."""
    os.chmod(backup.path, 0o600)
    backup.path.unlink()
    (backup.path.parent / (backup.path.name + ".manifest.json")).unlink()


def test_prune_true_deletes_the_cloud_copy_of_a_locally_pruned_backup(
        deployment: Deployment, weed: WeedServer, capsys: pytest.CaptureFixture[str]) -> None:
    weed.create_bucket("prune-bucket", object_lock=False)
    site = Site(deployment, weed, "prune-bucket", lock=False)
    site.config_path.write_text(site.config_path.read_text() + "prune = true\n")
    gone, _ = site.store_backup("hospital", size=50_000)
    kept, _ = site.store_backup("pharmacy", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    _prune_locally(gone)
    capsys.readouterr()
    assert site.run("prune") == ExitCode.OK
    assert "deleted db1/hospital/" in capsys.readouterr().out
    client = weed.client()
    assert "Versions" not in client.list_object_versions(Bucket="prune-bucket",
                                                         Prefix="backhaul/db1/hospital/")
    assert client.head_object(Bucket="prune-bucket", Key=site.object_key(kept))
    assert list(state.load(site.store_root, "weed").copied) == [
        kept.path.relative_to(site.store_root).as_posix()]


def test_prune_never_deletes_a_cloud_copy_still_under_lock(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.config_path.write_text(site.config_path.read_text() + "prune = true\n")
    backup, _ = site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    _prune_locally(backup)
    capsys.readouterr()
    assert site.run("prune") == ExitCode.OK
    assert "kept db1/hospital/hospital_20261126.sql.zst: locked until" in capsys.readouterr().out
    assert site.weed.client().head_object(Bucket=site.bucket, Key=site.object_key(backup))


def test_without_prune_true_the_bucket_is_left_alone(
        deployment: Deployment, weed: WeedServer) -> None:
    weed.create_bucket("noprune-bucket", object_lock=False)
    site = Site(deployment, weed, "noprune-bucket", lock=False)
    backup, _ = site.store_backup("hospital", size=50_000)
    assert site.run("offsite", "sync") == ExitCode.OK
    _prune_locally(backup)
    assert site.run("prune") == ExitCode.OK
    assert weed.client().head_object(Bucket="noprune-bucket", Key=site.object_key(backup))


async def test_an_agent_backup_is_copied_off_site_as_soon_as_it_is_stored(
        deployment: Deployment, weed: WeedServer, bucket: str, mariadb: MariaDBServer,
        tmp_path: Path) -> None:
    """The real path: agent → collector store → outcome wakes the copier → bucket."""
    from harness import mysql_source, run_agent, running_collector

    mariadb.execute("CREATE DATABASE IF NOT EXISTS offsite_e2e")
    mariadb.execute("CREATE TABLE IF NOT EXISTS offsite_e2e.t (id INT PRIMARY KEY, v TEXT)")
    mariadb.execute("REPLACE INTO offsite_e2e.t VALUES (1, 'patient'), (2, 'record')")
    site = Site(deployment, weed, bucket)
    pw = tmp_path / "mysql.pass"
    pw.write_text(mariadb.root_password + "\n")
    pw.chmod(0o600)
    async with running_collector(site.config_path) as (_, port):
        agent = deployment.agent_toml(
            "db1", port, mysql_source(mariadb.port, '["offsite_e2e"]', password_file=pw))
        run = await run_agent(agent)
        assert run.returncode == 0, run.stderr
        # The copier's own rescan is an hour away: only the stored outcome can wake it.
        await _until(lambda: bool(state.load(site.store_root, "weed").copied), timeout=60)
    (stored,) = (site.store_root / "db1" / "offsite_e2e").glob("*.sql.zst")
    key = "backhaul/" + stored.relative_to(site.store_root).as_posix() + ".age"
    ciphertext = weed.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    plain = await asyncio.to_thread(stock_age_decrypt, ciphertext, site.identities[0])
    assert plain == stored.read_bytes()


def test_a_part_altered_in_transit_is_refused_by_its_content_md5(site: Site) -> None:
    """Bodies go unsigned (as botocore sends them over https with a Content-MD5); the
    signed Content-MD5 still covers them: one byte changed on the way is refused by the
    server, the upload is aborted and no object shows."""
    import io

    from collector.offsite.bucket import Bucket, OffsiteError

    bucket = Bucket(site.config.offsite[0])
    altered: list[int] = []

    def flip_a_byte(request: Any, **_: object) -> None:
        if request.method == "PUT" and "partNumber=" in request.url and not altered:
            sent = request.body
            body = bytearray(sent.read() if hasattr(sent, "read") else sent)
            body[len(body) // 2] ^= 0x01
            request.body = bytes(body)
            altered.append(len(body))

    bucket.client.meta.events.register("before-send.s3.UploadPart", flip_a_byte)
    with pytest.raises(OffsiteError) as refused:
        bucket.upload_stream("backhaul/altered.age", io.BytesIO(os.urandom(6 * 2**20)))
    assert "BadDigest" in str(refused.value)
    assert altered, "the hook never saw an UploadPart"
    client = site.weed.client()
    assert not client.list_multipart_uploads(Bucket=site.bucket).get("Uploads")
    assert "Versions" not in client.list_object_versions(Bucket=site.bucket)


def test_sync_aborts_unfinished_uploads_older_than_a_day_and_only_those(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    client = site.weed.client()
    old = client.create_multipart_upload(Bucket=site.bucket, Key="backhaul/old.age")
    assert site.run("offsite", "sync") == ExitCode.OK  # a fresh upload: left alone
    uploads = client.list_multipart_uploads(Bucket=site.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [old["UploadId"]]
    from collector.offsite import bucket as bucket_module

    monkeypatch.setattr(bucket_module, "STALE_UPLOAD", timedelta(0))  # now it is old
    assert site.run("offsite", "sync") == ExitCode.OK
    assert not client.list_multipart_uploads(Bucket=site.bucket).get("Uploads")
