"""`recover`: rebuild the local store from an off-site target, checking everything first.

For each cloud manifest in scope: skip a backup the store already has (never
overwrite); else stream the object through a SHA-256 of the ciphertext and `age -d`,
and the plaintext through the ingest check (SHA-256, byte count, compressed stream,
dump completeness) into a temporary file of the store. Only when the ciphertext hash
matches the cloud manifest and the ingest check passes is the backup published, under
its own name, by the store's atomic path. Blocking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.offsite.age_stream import decrypting
from collector.offsite.bucket import Bucket
from collector.offsite.config import OffsiteTarget
from collector.offsite.copy import OBJECT_SUFFIX
from collector.store.files import Store, check_agent_name
from common.credentials import check_secret_mode
from common.errors import BackhaulError, ConfigError, IntegrityError, RemoteProtocolError
from common.integrity import IntegrityChecker
from common.naming import MANIFEST_SUFFIX, decode_database, extension_for, parse_backup_name

if TYPE_CHECKING:
    from collector.config import CollectorConfig

log = logging.getLogger(__name__)
PLAIN_CHUNK = 1024 * 1024


@dataclass
class RecoverRun:
    """What one `recover` did: refs stored, skipped and failed, with the reason."""

    stored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    ref: str
    agent: str
    database: str
    name: str
    ext: str


def _parse_ref(ref: str) -> _Item | None:
    parts = ref.split("/")
    if len(parts) != 3:
        return None
    agent, encoded, name = parts
    try:
        check_agent_name(agent)
        database = decode_database(encoded)
    except (ConfigError, ValueError):
        return None
    parsed = parse_backup_name(name)
    if parsed is None or parsed.database != database:
        return None
    return _Item(ref, agent, database, name, parsed.ext)


def check_identity(identity: Path) -> None:
    """The identity file must exist and be its owner's alone (it is the private key).

    Raises:
        ConfigError: missing, or readable by group or others.
    """
    try:
        info = os.stat(identity)
    except OSError as exc:
        raise ConfigError(f"--identity {identity}: {exc.strerror}") from None
    check_secret_mode(info, identity, "--identity: age key", service_group=False)


def recover(target: OffsiteTarget, config: CollectorConfig, identity: Path,
            agent: str | None = None, database: str | None = None,
            progress: Callable[[str], None] = lambda line: None) -> RecoverRun:
    """Recover every backup of ``target`` in scope that the local store lacks.

    Raises:
        ConfigError: bad identity file or agent name.
        OffsiteError: the bucket cannot be listed.
    """
    check_identity(identity)
    if agent is not None:
        check_agent_name(agent)
    bucket = Bucket(target)
    store = Store(config.storage.root)
    store.ensure_root()
    run = RecoverRun()
    refs = sorted(key[len(target.prefix):-len(MANIFEST_SUFFIX)]
                  for key in bucket.keys(f"{agent}/" if agent else "")
                  if key.endswith(MANIFEST_SUFFIX))
    for ref in refs:
        item = _parse_ref(ref)
        if item is None:
            run.skipped.append((ref, "not a backup of the Backhaul layout"))
            progress(f"skipped {ref}: not a backup of the Backhaul layout")
            continue
        if database is not None and item.database != database:
            continue
        if (store.database_folder(item.agent, item.database) / item.name).exists():
            run.skipped.append((ref, "already in the local store"))
            progress(f"skipped {ref}: already in the local store")
            continue
        try:
            _recover_one(bucket, store, item, identity, config.storage.max_expansion)
        except BackhaulError as exc:
            log.error("recover %s from %s failed: %s", ref, target.name, exc)
            run.failed.append((ref, str(exc)))
            progress(f"FAILED {ref}: {exc}")
            continue
        log.info("recovered %s from %s", ref, target.name)
        run.stored.append(ref)
        progress(f"recovered {ref}")
    return run


def _recover_one(bucket: Bucket, store: Store, item: _Item, identity: Path,
                 max_expansion: int) -> None:
    cloud = _cloud_manifest(bucket, item)
    backup: dict[str, Any] = cloud["backup"]
    upload = store.begin(item.agent, item.database, item.ext)
    try:
        verifier = IntegrityChecker(str(backup["format"]), str(backup["compression"]),
                                  max_expansion)
        cipher = hashlib.sha256()
        cipher_size = [0]

        def on_ciphertext(chunk: bytes) -> None:
            cipher.update(chunk)
            cipher_size[0] += len(chunk)

        chunks = bucket.chunks(bucket.key(item.ref + OBJECT_SUFFIX))
        with decrypting(identity, chunks, on_ciphertext) as plain:
            while chunk := plain.read(PLAIN_CHUNK):
                verifier.feed(chunk)
                upload.write(chunk)
        if cipher.hexdigest() != cloud["ciphertext_sha256"] or \
                cipher_size[0] != cloud["ciphertext_size"]:
            raise IntegrityError("the object's SHA-256 or size differs from its cloud manifest")
        verifier.finish(int(backup["size"]), str(backup["sha256"]))
        recovered = {**backup, "recovered_from": bucket.target.name,
                     "recovered_at": datetime.now(UTC).isoformat(timespec="seconds")}
        upload.commit_as(item.name, recovered)
    except BaseException:
        upload.discard()
        raise


def _cloud_manifest(bucket: Bucket, item: _Item) -> dict[str, Any]:
    try:
        cloud = json.loads(bucket.read(bucket.key(item.ref + MANIFEST_SUFFIX)))
        backup = cloud["backup"]
        complete = all(isinstance(cloud.get(k), str | int) for k in
                       ("ciphertext_sha256", "ciphertext_size", "plaintext_sha256"))
        if not complete or not isinstance(backup, dict) or \
                backup.get("sha256") != cloud["plaintext_sha256"]:
            raise ValueError("fields missing or inconsistent")
        if extension_for(str(backup.get("format")), str(backup.get("compression"))) \
                != item.ext or backup.get("database") != item.database:
            raise ValueError("it describes another database or format than its name")
    except (ValueError, KeyError, TypeError, RemoteProtocolError) as exc:
        raise IntegrityError(f"cloud manifest of {item.ref} is unusable: {exc}") from None
    return dict(cloud)
