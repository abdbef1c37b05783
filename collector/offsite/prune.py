"""Cloud copies of pruned backups: deleted only with `prune = true`, never under lock.

A target's copies follow the local retention policy: once `prune` has removed a backup
from the store, its cloud object and manifest go too, on targets that opt in. An
object whose Object Lock retention has not passed is kept and reported, and tried
again at the next prune. Without `prune = true` nothing in the bucket is ever deleted.
Blocking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from collector.offsite import state
from collector.offsite.bucket import Bucket, OffsiteError
from collector.offsite.config import OffsiteTarget
from collector.offsite.copy import OBJECT_SUFFIX
from common.naming import MANIFEST_SUFFIX

log = logging.getLogger(__name__)


@dataclass
class CloudPrune:
    """What one target's prune did, or would do with ``dry_run``."""

    target: str
    deleted: list[str] = field(default_factory=list)
    locked: list[tuple[str, datetime]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def gone_locally(root: Path, target: str) -> list[str]:
    """Refs copied to ``target`` whose local backup the store no longer has."""
    copied = state.load(root, target).copied
    return sorted(ref for ref in copied if not (root / ref).exists())


def prune_target(target: OffsiteTarget, root: Path, dry_run: bool = False,
                 bucket: Bucket | None = None) -> CloudPrune:
    """Delete the cloud copies of backups pruned locally, except those still locked.

    Raises:
        OffsiteError: the bucket cannot be reached.
    """
    run = CloudPrune(target.name)
    if not target.prune:
        return run
    refs = gone_locally(root, target.name)
    if not refs:
        return run
    bucket = bucket or Bucket(target)
    now = datetime.now(UTC)
    done: list[str] = []
    for ref in refs:
        keys = [bucket.key(ref + OBJECT_SUFFIX), bucket.key(ref + MANIFEST_SUFFIX)]
        try:
            versions = [bucket.lock_until(key) for key in keys]
            held = max((until for _, until in versions if until is not None), default=None)
            if held is not None and held > now:
                run.locked.append((ref, held))
                continue
            if not dry_run:
                for key, (version, _) in zip(keys, versions, strict=True):
                    if version is not None or bucket.exists(key):
                        bucket.delete_version(key, version)
                log.info("offsite %s: deleted the cloud copy of pruned %s", target.name, ref)
                done.append(ref)
            run.deleted.append(ref)
        except OffsiteError as exc:
            log.error("offsite %s: cannot prune %s: %s", target.name, ref, exc)
            run.failed.append((ref, str(exc)))
    if done:
        state.forget(root, target.name, done)
    return run
