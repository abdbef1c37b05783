"""What the store holds and whether it is still intact: the backups found in it and their
re-verification against their manifests.

Re-verification reads every selected backup to its end through the checker ingest uses
(:mod:`common.integrity`): byte count and SHA-256 against the manifest, the compression
stream decoded to its end, and the dump format's completeness mark. A data file whose
manifest is missing or unreadable is a mismatch too: without it nothing can be proven.

A verify run records its mismatches in the status file of :mod:`collector.store.verify_status`,
through which the serving collector learns of bit rot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from collector.store.files import check_agent_name, iter_backups
from collector.store.verify_status import Finding, RunRecord, Scope, record
from common.compression import KINDS
from common.errors import IntegrityError, StorageError
from common.integrity import FORMAT_CHECKS, IntegrityChecker
from common.naming import MANIFEST_SUFFIX, decode_database, encode_database, parse_backup_name

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024

OK = "OK"
MISMATCH = "MISMATCH"
GONE = "GONE"  # deleted (by prune) while verify was running: neither good nor bad


@dataclass(frozen=True)
class Entry:
    """A data file in a database folder and its manifest (None: missing or unreadable)."""

    agent: str
    database: str
    folder: Path
    name: str
    day: date
    seq: int
    manifest: Mapping[str, Any] | None

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def manifest_sha256(self) -> str:
        value = self.manifest.get("sha256") if self.manifest is not None else None
        return value if isinstance(value, str) else ""


def entry_key(entry: Entry) -> tuple[str, str, str, str]:
    """The key of ``entry`` in :meth:`~collector.store.verify_status.VerifyStatus.mismatched`."""
    return entry.agent, entry.database, entry.name, entry.manifest_sha256


def scan(root: Path, agent: str | None = None, database: str | None = None) -> list[Entry]:
    """Every data file under ``root`` (optionally one agent, one database), in order."""
    if agent is not None:
        check_agent_name(agent)
    entries: list[Entry] = []
    for agent_dir in _agent_folders(root, agent):
        for name, folder in _database_folders(agent_dir, database):
            entries.extend(_folder_entries(agent_dir.name, name, folder))
    return entries


def agent_folders(root: Path) -> list[str]:
    """Names of the agent folders in the store."""
    return [path.name for path in _agent_folders(root, None)]


def _agent_folders(root: Path, agent: str | None) -> list[Path]:
    if agent is not None:
        return [root / agent] if (root / agent).is_dir() else []
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def _database_folders(agent_dir: Path, database: str | None) -> Iterator[tuple[str, Path]]:
    if database is not None:
        folder = agent_dir / encode_database(database)
        if folder.is_dir():
            yield database, folder
        return
    for folder in sorted(p for p in agent_dir.iterdir() if p.is_dir()):
        try:
            yield decode_database(folder.name), folder
        except ValueError:
            log.warning("skipping %s: not a database folder of the store", folder)


def _folder_entries(agent: str, database: str, folder: Path) -> list[Entry]:
    # Names first, manifests second: a backup is published manifest first, so every data
    # file listed here already has its manifest when iter_backups reads the folder.
    names = os.listdir(folder)
    manifests = {backup.name: backup.manifest for backup in iter_backups(folder)}
    entries = []
    for file_name in names:
        parsed = parse_backup_name(file_name)
        if parsed is None or not (folder / file_name).is_file():
            continue  # not a backup, or deleted by prune since the listing
        manifest = manifests.get(file_name)
        entries.append(Entry(agent, database, folder, file_name, parsed.day, parsed.seq, manifest))
    entries.sort(key=lambda e: (e.day, e.seq, e.name))
    return entries


# -- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """The outcome of re-verifying one backup: OK, MISMATCH (with reasons) or GONE."""

    entry: Entry
    status: str
    reasons: tuple[str, ...] = ()


def check_backup(entry: Entry, max_ratio: int | None = None) -> Check:
    """Re-read one stored backup and compare it with its manifest.

    Raises:
        StorageError: the file cannot be read for lack of permission (a setup problem,
            not bit rot: run verify as the collector's user).
    """
    if entry.manifest is None:
        if not entry.path.exists():
            return Check(entry, GONE)
        return Check(entry, MISMATCH, ("manifest missing or unreadable",))
    checker = _checker_for(entry.manifest, max_ratio)
    try:
        with open(entry.path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                # A problem in the content is kept by the checker; reading on still
                # gives the size and SHA-256 to report beside it.
                with contextlib.suppress(IntegrityError):
                    checker.feed(chunk)
    except FileNotFoundError:
        if _manifest_follows(entry):
            return Check(entry, GONE)
        return Check(entry, MISMATCH, ("data file deleted but its manifest left",))
    except PermissionError as exc:
        raise StorageError(f"cannot read {entry.path}: {exc.strerror}") from None
    except OSError as exc:
        return Check(entry, MISMATCH, (f"read error: {exc.strerror or exc}",))
    reasons = checker.audit(entry.manifest.get("size"), entry.manifest.get("sha256"))
    return Check(entry, MISMATCH if reasons else OK, tuple(reasons))


def _checker_for(manifest: Mapping[str, Any], max_ratio: int | None) -> IntegrityChecker:
    fmt, compression = manifest.get("format"), manifest.get("compression")
    if not isinstance(fmt, str) or fmt not in FORMAT_CHECKS:
        return IntegrityChecker.refusing(f"manifest names an unknown format {fmt!r}")
    if compression not in KINDS:
        return IntegrityChecker.refusing(f"manifest names an unknown compression {compression!r}")
    return IntegrityChecker(fmt, compression, max_ratio)


def _manifest_follows(entry: Entry, wait: float = 1.0) -> bool:
    """Whether the manifest goes too within ``wait`` seconds, as when prune deletes."""
    manifest = entry.path.with_name(entry.name + MANIFEST_SUFFIX)
    deadline = time.monotonic() + wait
    while manifest.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass(frozen=True)
class VerifyRun:
    """The result of :func:`verify_store`."""

    run_id: str
    checks: list[Check]

    @property
    def mismatches(self) -> list[Check]:
        return [check for check in self.checks if check.status == MISMATCH]


def verify_store(
    root: Path,
    scope: Scope,
    max_ratio: int | None = None,
    progress: Callable[[Check], None] | None = None,
) -> VerifyRun:
    """Re-verify every backup in ``scope``, log each mismatch and update the status file.

    Raises:
        ConfigError: the agent name is invalid.
        StorageError: a file cannot be read for lack of permission, or the status file
            cannot be written.
    """
    started = datetime.now(UTC)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
    checks = []
    for entry in scan(root, scope.agent, scope.database):
        check = check_backup(entry, max_ratio)
        if check.status == MISMATCH:
            log.error(
                "verify mismatch agent=%s database=%s name=%s: %s",
                entry.agent,
                entry.database,
                entry.name,
                "; ".join(check.reasons),
            )
        checks.append(check)
        if progress is not None:
            progress(check)
    run = VerifyRun(run_id, checks)
    if root.is_dir():
        record(root, _run_record(run, scope, started))
    log.info(
        "verify run %s: %d backup(s) checked, %d mismatch(es)",
        run_id,
        len(checks),
        len(run.mismatches),
    )
    return run


def _run_record(run: VerifyRun, scope: Scope, started: datetime) -> RunRecord:
    finished = datetime.now(UTC)
    findings = [
        Finding(run.run_id, finished.isoformat(), *entry_key(c.entry), "; ".join(c.reasons))
        for c in run.mismatches
    ]
    return RunRecord(run.run_id, scope, started, finished, len(run.checks), findings)
