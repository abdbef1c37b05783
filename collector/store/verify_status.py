"""The verify status file: where ``verify`` records its findings and how ``serve`` reads them.

How the serving collector learns of a mismatch
----------------------------------------------

``backhaul-collector verify`` runs as its own process (by hand or from a timer), while
the metrics live in the ``serve`` process. Verify therefore records its findings in
``<root>/.verify-status.json`` (temporary file, fsync, rename: a reader sees the old or the
new file, never half of one). The serving collector registers a
:class:`VerifyStatusReader` on its metrics registry; at each scrape the reader re-reads the
file if it changed and hands every finding it has not counted yet to
``CollectorMetrics.verify_mismatch``, so ``backhaul_verify_mismatches_total`` rises and the
``BackhaulVerifyMismatch`` rule fires. Each verify run has its own id, so a backup still
corrupt at the next run is counted again and the alert stays up; a finding whose backup
has since been deleted is not counted.

The reader is registered after the metrics it feeds: the scrape that reads a new finding
still reports the old count and the next one the new count. Prometheus thus always sees
the step, even on the first scrape after a restart, when a counter that appeared already
raised would look as if it had never moved.

A run over part of the store (``--agent``, ``--database``) replaces the findings within
its scope and keeps the others. A run arrives here as a :class:`RunRecord` of plain
findings, so this module needs nothing of :mod:`collector.store.inventory`, which writes
through it.

Writers of the status file are serialised by :func:`common.fsutil.file_lock` on
``<root>/.verify-status.lock``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from collector.store.files import check_agent_name
from common.errors import ConfigError, StorageError
from common.fsutil import file_lock, fsync_dir, give_to_folder_owner
from common.naming import encode_database, parse_backup_name

log = logging.getLogger(__name__)

STATUS_FILE = ".verify-status.json"
STATUS_LOCK = ".verify-status.lock"
STATUS_VERSION = 1
STATUS_MODE = 0o640  # the serving collector (same user) reads it; the admin group may too


@dataclass(frozen=True)
class Finding:
    """One mismatch as recorded in the status file."""

    run_id: str
    found_at: str
    agent: str
    database: str
    name: str
    sha256: str
    reason: str


@dataclass(frozen=True)
class VerifyStatus:
    """What the status file says: the last run and the findings still standing."""

    last_run: Mapping[str, Any]
    findings: list[Finding]

    def mismatched(self) -> set[tuple[str, str, str, str]]:
        """Keys (agent, database, name, manifest SHA-256) of backups found corrupt."""
        return {(f.agent, f.database, f.name, f.sha256) for f in self.findings}


@dataclass(frozen=True)
class Scope:
    """What one verify run covers: everything, one agent, or one database of one agent."""

    agent: str | None = None
    database: str | None = None

    def covers(self, agent: str, database: str) -> bool:
        if self.agent is not None and agent != self.agent:
            return False
        return self.database is None or database == self.database


@dataclass(frozen=True)
class RunRecord:
    """One verify run as the status file keeps it."""

    run_id: str
    scope: Scope
    started: datetime
    finished: datetime
    checked: int
    findings: list[Finding]


def load_status(root: Path) -> VerifyStatus | None:
    """Read ``<root>/.verify-status.json``; None if verify never ran.

    Raises:
        ValueError: the file is unreadable or malformed.
    """
    try:
        text = (root / STATUS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {root / STATUS_FILE}: {exc.strerror}") from None
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != STATUS_VERSION:
        raise ValueError(f"{root / STATUS_FILE} is not a verify status of version 1")
    last_run, raw = data.get("last_run"), data.get("mismatches")
    if not isinstance(last_run, dict) or not isinstance(raw, list):
        raise ValueError(f"{root / STATUS_FILE} lacks last_run or mismatches")
    return VerifyStatus(last_run, [_finding(item) for item in raw])


def load_status_or_warn(root: Path) -> VerifyStatus | None:
    """:func:`load_status`, with a malformed file logged and treated as absent."""
    try:
        return load_status(root)
    except ValueError as exc:
        log.warning("ignoring the verify status: %s", exc)
        return None


def _finding(item: object) -> Finding:
    if not isinstance(item, dict):
        raise ValueError("a mismatch entry is not an object")
    values = {}
    for key in Finding.__dataclass_fields__:
        value = item.get(key)
        if not isinstance(value, str):
            raise ValueError(f"a mismatch entry lacks {key}")
        values[key] = value
    finding = Finding(**values)
    try:
        check_agent_name(finding.agent)
    except ConfigError:
        raise ValueError(f"a mismatch entry names no agent: {finding.agent!r}") from None
    if parse_backup_name(finding.name) is None:
        raise ValueError(f"a mismatch entry names no backup: {finding.name!r}")
    return finding


def record(root: Path, run: RunRecord) -> None:
    """Merge the findings of ``run`` into the status file, replacing those within its scope.

    Raises:
        StorageError: the status file or its lock cannot be written.
    """
    with file_lock(root, STATUS_LOCK):  # two runs of different scopes must not lose findings
        _merge_status(root, run)


def _merge_status(root: Path, run: RunRecord) -> None:
    previous = load_status_or_warn(root)
    kept = (
        [f for f in previous.findings if not run.scope.covers(f.agent, f.database)]
        if previous is not None
        else []
    )
    status = {
        "version": STATUS_VERSION,
        "last_run": {
            "id": run.run_id,
            "started_at": run.started.isoformat(),
            "finished_at": run.finished.isoformat(),
            "scope": asdict(run.scope),
            "checked": run.checked,
            "mismatched": len(run.findings),
        },
        "mismatches": [asdict(f) for f in [*kept, *run.findings]],
    }
    write_atomically(root, STATUS_FILE, json.dumps(status, indent=2).encode())


def write_atomically(root: Path, name: str, content: bytes) -> None:
    """Replace ``root/name`` with ``content`` all at once: temp, fsync, rename, folder fsync.

    Raises:
        StorageError: naming the file.
    """
    temp = root / f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STATUS_MODE)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, STATUS_MODE)
            give_to_folder_owner(fd, root)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, root / name)
        fsync_dir(root)
    except OSError as exc:
        raise StorageError(f"cannot write {root / name}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class VerifyStatusReader:
    """A scrape-time collector that feeds new findings of verify runs to ``on_mismatch``.

    It exposes no metric of its own; ``on_mismatch(agent, database)`` is meant to be
    ``CollectorMetrics.verify_mismatch``. See the module docstring for the timing.
    """

    def __init__(self, root: Path, on_mismatch: Callable[[str, str], None]) -> None:
        self._root = root
        self._on_mismatch = on_mismatch
        self._lock = threading.Lock()  # scrapes run in worker threads, maybe two at once
        self._signature: tuple[int, int, int] | None = None
        self._counted: set[tuple[str, str, str, str]] = set()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self.refresh()
        return []

    def refresh(self) -> int:
        """Count the findings not counted yet; returns how many were new."""
        with self._lock:
            try:
                st = os.stat(self._root / STATUS_FILE)
            except OSError:
                self._signature = None
                return 0
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return 0
            self._signature = signature
            try:
                status = load_status(self._root)
            except ValueError as exc:
                log.warning("cannot use the verify status: %s", exc)
                return 0
            return self._count(status.findings if status is not None else [])

    def _count(self, findings: Sequence[Finding]) -> int:
        new = 0
        for finding in findings:
            key = (finding.run_id, finding.agent, finding.database, finding.name)
            if key in self._counted:
                continue
            self._counted.add(key)
            path = self._root / finding.agent / encode_database(finding.database) / finding.name
            if not path.exists():
                continue  # deleted since; nothing corrupt is stored any more
            log.warning(
                "verify run %s found %s of %s/%s corrupt: %s",
                finding.run_id,
                finding.name,
                finding.agent,
                finding.database,
                finding.reason,
            )
            self._on_mismatch(finding.agent, finding.database)
            new += 1
        return new
