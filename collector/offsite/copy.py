"""Copying stored backups to one target: what is pending, and one backup's copy.

The cloud layout mirrors the local store with `.age` added:
`<prefix><agent>/<encoded db>/<name>.age` and, written after it and only once it is
confirmed, `<prefix><agent>/<encoded db>/<name>.manifest.json` (plaintext: the local
manifest, the plaintext and ciphertext SHA-256, the recipients' fingerprints, the
lock). A manifest in the bucket therefore always describes a whole object.

Blocking: the copier runs these in worker threads; `offsite sync` calls them directly.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from collector.offsite import state
from collector.offsite.age_stream import encrypting, fingerprint, read_recipients
from collector.offsite.bucket import Bucket, OffsiteError
from collector.store.files import Store, StoredBackup
from collector.store.inventory import agent_folders
from common.naming import MANIFEST_SUFFIX

log = logging.getLogger(__name__)
CLOUD_VERSION = 1
OBJECT_SUFFIX = ".age"


@dataclass(frozen=True)
class Pending:
    """A stored backup the target does not hold yet."""

    ref: str  # "agent/encoded db/name", the key below the prefix without suffix
    backup: StoredBackup

    @property
    def agent(self) -> str:
        return self.ref.split("/", 1)[0]


def ref_of(root: Path, backup: StoredBackup) -> str:
    return backup.path.relative_to(root).as_posix()


def pending(root: Path, target: str) -> list[Pending]:
    """Stored backups not recorded as copied to ``target``, oldest first."""
    copied = state.load(root, target).copied
    store = Store(root)
    found = []
    for agent in agent_folders(root):
        for backup in store.backups(agent):
            ref = ref_of(root, backup)
            if ref not in copied:
                found.append(Pending(ref, backup))
    return found


class _Stoppable:
    """A reader that fails between reads once ``stop()`` says so (shutdown mid-upload)."""

    def __init__(self, inner: IO[bytes], stop: Callable[[], bool]) -> None:
        self.inner = inner
        self.stop = stop

    def read(self, size: int) -> bytes:
        if self.stop():
            raise OffsiteError("stopped by shutdown")
        return self.inner.read(size)


def copy_backup(bucket: Bucket, root: Path, item: Pending,
                stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Encrypt and upload one backup and its manifest, then record it; returns the facts.

    If the bucket already holds this backup's manifest (a copy confirmed before a crash
    lost the record), the manifest is taken as proof and nothing is uploaded again.

    Raises:
        OffsiteError: a request failed (any multipart upload was aborted).
        StorageError: the local file cannot be read or the state cannot be written.
        ConfigError: the recipients file became unreadable.
    """
    target = bucket.target
    manifest_key = bucket.key(item.ref + MANIFEST_SUFFIX)
    object_key = bucket.key(item.ref + OBJECT_SUFFIX)
    if bucket.exists(manifest_key):
        cloud = json.loads(bucket.read(manifest_key))
        facts = _facts(cloud, object_key)
        state.mark_copied(root, target.name, item.ref, facts)
        log.info("offsite %s: %s was already there", target.name, item.ref)
        return facts
    recipients = read_recipients(target.recipients_file, f"{target.where}recipients_file")
    with encrypting(item.backup.path, target.recipients_file) as stream:
        reader = _Stoppable(stream, stop)
        put = bucket.upload_stream(object_key, reader,  # type: ignore[arg-type]
                                   item.backup.path.stat().st_size)
    local = item.backup.manifest
    cloud = {
        "cloud_manifest_version": CLOUD_VERSION,
        "object": object_key,
        "plaintext_sha256": local.get("sha256"),
        "plaintext_size": local.get("size"),
        "ciphertext_sha256": put.sha256,
        "ciphertext_size": put.size,
        "encryption": "age-v1-x25519",
        "recipients": [fingerprint(r) for r in recipients],
        "lock": {"mode": target.lock_mode,
                 "retain_until": put.retain_until.isoformat() if put.retain_until else None},
        "copied_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "collector": socket.gethostname(),
        "backup": local,
    }
    bucket.put_small(manifest_key, json.dumps(cloud, indent=2, sort_keys=True).encode())
    facts = _facts(cloud, object_key)
    state.mark_copied(root, target.name, item.ref, facts)
    log.info("offsite %s: copied %s (%d bytes encrypted)", target.name, item.ref, put.size)
    return facts


def _facts(cloud: dict[str, Any], object_key: str) -> dict[str, Any]:
    lock = cloud.get("lock") if isinstance(cloud.get("lock"), dict) else {}
    return {"key": object_key, "ciphertext_sha256": cloud.get("ciphertext_sha256"),
            "size": cloud.get("ciphertext_size"), "copied_at": cloud.get("copied_at"),
            "retain_until": (lock or {}).get("retain_until")}
