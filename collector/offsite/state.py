"""What each off-site target already holds, on the collector's disk, surviving restarts.

One JSON file per target in the storage root, `.offsite-<target>.json`: the backups
whose copy was confirmed (object and manifest HEAD-checked), and the last error. A
backup is marked only after its cloud manifest is confirmed, so a crash at any moment
means at worst one more copy, never a lost one. Every change re-reads the file under
an exclusive lock and replaces it atomically, so `serve` and `offsite sync` running at
once lose nothing. Blocking: call from a worker thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from collector.store.verify_status import write_atomically
from common.fsutil import file_lock

log = logging.getLogger(__name__)
VERSION = 1


def state_file(target: str) -> str:
    return f".offsite-{target}.json"


@dataclass
class TargetState:
    """The recorded state of one target."""

    copied: dict[str, dict[str, Any]] = field(default_factory=dict)  # "agent/db/name" → facts
    last_error: str | None = None
    last_error_at: str | None = None
    last_success_at: str | None = None
    failures_in_a_row: int = 0


def load(root: Path, target: str) -> TargetState:
    """The state as on disk; an absent file is an empty state.

    An unreadable file is logged and taken as empty: everything is then copied again,
    which costs bandwidth but loses nothing.
    """
    path = root / state_file(target)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return TargetState()
    except (OSError, ValueError) as exc:
        log.error("offsite %s: cannot read %s (%s); copying everything again", target, path, exc)
        return TargetState()
    if not isinstance(data, dict) or data.get("version") != VERSION:
        log.error("offsite %s: %s is not a state of version %d", target, path, VERSION)
        return TargetState()
    copied = data.get("copied")
    return TargetState(
        copied=copied if isinstance(copied, dict) else {},
        last_error=data.get("last_error"),
        last_error_at=data.get("last_error_at"),
        last_success_at=data.get("last_success_at"),
        failures_in_a_row=int(data.get("failures_in_a_row") or 0),
    )


def _save(root: Path, target: str, state: TargetState) -> None:
    data = {"version": VERSION, "copied": state.copied, "last_error": state.last_error,
            "last_error_at": state.last_error_at, "last_success_at": state.last_success_at,
            "failures_in_a_row": state.failures_in_a_row}
    write_atomically(root, state_file(target), json.dumps(data, indent=1, sort_keys=True).encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def mark_copied(root: Path, target: str, ref: str, facts: dict[str, Any]) -> TargetState:
    """Record one confirmed copy and clear the error streak.

    Raises:
        StorageError: the state cannot be written (the copy is then made again later).
    """
    with file_lock(root, f".offsite-{target}.lock"):
        state = load(root, target)
        state.copied[ref] = facts
        state.last_success_at = _now()
        state.failures_in_a_row = 0
        state.last_error = None
        _save(root, target, state)
    return state


def record_error(root: Path, target: str, message: str) -> TargetState:
    """Record a failed attempt (the streak decides when to notify).

    Raises:
        StorageError: the state cannot be written.
    """
    with file_lock(root, f".offsite-{target}.lock"):
        state = load(root, target)
        state.last_error = message
        state.last_error_at = _now()
        state.failures_in_a_row += 1
        _save(root, target, state)
    return state


def forget(root: Path, target: str, refs: list[str]) -> None:
    """Drop entries (their cloud copies were pruned). Raises StorageError."""
    with file_lock(root, f".offsite-{target}.lock"):
        state = load(root, target)
        for ref in refs:
            state.copied.pop(ref, None)
        _save(root, target, state)
