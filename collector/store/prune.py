"""Retention on the collector: runs the pure policy of :mod:`collector.store.retention` over the
store and deletes what it says. Only this command deletes backups; the wire protocol has
no verb for it, so no agent can.

For each configured agent and each of its database folders, every data file becomes a
:class:`~collector.store.retention.Backup`: its name, ``made_at`` from the manifest's
``started_at``, the day from the name, and verified when the manifest says so, the data
file still has the manifest's size, and the last verify run that covered it did not find
it corrupt. A backup whose manifest is missing, unreadable or has no usable
``started_at`` cannot be judged and is always kept (and counted as kept).

A planned deletion removes the data file first and then its manifest, and the folder is
fsynced afterwards. A crash in between leaves a manifest without data, which is never
listed and which the collector sweeps at its next start; prune itself never sweeps, as a
manifest without data is also how a backup being published looks for a moment. Files
are read-only (0440); deleting them needs write permission on the folder only, which the
collector's user has.

Agent folders in the store that are not in collector.toml are left alone: a
decommissioned host's backups are not deleted because its entry was removed. One prune
runs at a time (an flock on ``<root>/.prune.lock``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from collector.config import CollectorConfig
from collector.store.inventory import Entry, agent_folders, scan
from collector.store.listing import counts_as_verified, render_table, started_at
from collector.store.retention import Backup, RetentionPlan, plan
from collector.store.verify_status import load_status_or_warn
from common.errors import ConfigError
from common.fsutil import file_lock, fsync_dir
from common.naming import MANIFEST_SUFFIX

log = logging.getLogger(__name__)

REASON = "retention"
LOCK_FILE = ".prune.lock"


@dataclass
class DatabasePrune:
    """The plan for one database folder and, after :func:`apply`, what was deleted."""

    agent: str
    database: str
    folder: Path
    plan: RetentionPlan
    unjudged: list[str]  # names kept because their manifest cannot be read
    deleted: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def kept(self) -> int:
        return len(self.plan.keep) + len(self.unjudged)

    @property
    def not_deleted(self) -> int:
        """Planned deletions left undone by an error or a stop signal."""
        return len(self.plan.delete) - len(self.deleted)


@dataclass
class PruneRun:
    """Every database's plan, the agent folders left alone, and whether a signal stopped it."""

    root: Path
    databases: list[DatabasePrune]
    unconfigured_agents: list[str]
    stopped: bool = False

    @property
    def failed(self) -> bool:
        return self.stopped or any(db.error for db in self.databases)


def plan_store(
    config: CollectorConfig,
    agent: str | None = None,
    database: str | None = None,
    now: datetime | None = None,
) -> PruneRun:
    """Plan retention for every configured agent (or one) and database (or one).

    Raises:
        ConfigError: ``agent`` is not configured.
        ValueError: ``now`` is naive.
    """
    configured = [entry.name for entry in config.agents]
    if agent is not None and agent not in configured:
        raise ConfigError(f"--agent {agent!r} is not an agent of {config.source}")
    root = config.storage.root
    now = now or datetime.now(UTC)
    status = load_status_or_warn(root)
    mismatched = status.mismatched() if status is not None else set()
    groups: dict[Path, list[Entry]] = {}
    for name in [agent] if agent is not None else configured:
        for entry in scan(root, name, database):
            groups.setdefault(entry.folder, []).append(entry)
    databases = []
    for folder, entries in groups.items():
        backups, unjudged = _backups(entries, mismatched)
        databases.append(
            DatabasePrune(
                entries[0].agent,
                entries[0].database,
                folder,
                plan(backups, config.retention, now),
                unjudged,
            )
        )
    others = [] if agent is not None else [a for a in agent_folders(root) if a not in configured]
    return PruneRun(root, databases, others)


def _backups(
    entries: Sequence[Entry], mismatched: set[tuple[str, str, str, str]]
) -> tuple[list[Backup], list[str]]:
    backups, unjudged = [], []
    for entry in entries:
        made_at = started_at(entry)
        if made_at is None:
            log.warning(
                "keeping %s: its manifest is missing, unreadable or has no start time", entry.path
            )
            unjudged.append(entry.name)
            continue
        backups.append(
            Backup(
                entry.name,
                made_at.astimezone(UTC),
                entry.day,
                counts_as_verified(entry, mismatched),
            )
        )
    return backups, unjudged


def prune_store(
    config: CollectorConfig,
    agent: str | None = None,
    database: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PruneRun:
    """Plan and delete under the prune lock; see :func:`plan_store` and :func:`apply`.

    Raises:
        ConfigError: ``agent`` is not configured.
        StorageError: another prune is running, or the lock cannot be taken.
    """
    if not config.storage.root.is_dir():
        return plan_store(config, agent, database)
    with file_lock(config.storage.root, LOCK_FILE, wait=False, busy="another prune is running"):
        run = plan_store(config, agent, database)
        apply(run, should_stop)
    return run


def apply(run: PruneRun, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Delete every planned backup, oldest first per database (the caller holds the lock).

    An error stops that database's deletions (recorded in its ``error``) and the others go
    on; ``should_stop`` is asked before each deletion.
    """
    for database in run.databases:
        if not _delete_planned(database, should_stop):
            run.stopped = True
            log.warning("prune stopped by a signal; the rest is left for the next run")
            break
    log.info(
        "prune: %d backup(s) deleted, %d kept, %d held back by max_deletions",
        sum(len(db.deleted) for db in run.databases),
        sum(db.kept for db in run.databases),
        sum(db.plan.capped for db in run.databases),
    )


def _delete_planned(db: DatabasePrune, should_stop: Callable[[], bool]) -> bool:
    """Delete one database's planned backups; False if ``should_stop`` said so."""
    stopped = False
    for backup in db.plan.delete:
        if should_stop():
            stopped = True
            break
        data = db.folder / backup.name
        try:
            with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
                os.unlink(data)
        except OSError as exc:
            db.error = f"cannot delete {data}: {exc.strerror}"
            break
        db.deleted.append(backup.name)
        log.info(
            "deleted backup agent=%s database=%s name=%s reason=%s",
            db.agent,
            db.database,
            backup.name,
            REASON,
        )
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(db.folder / (backup.name + MANIFEST_SUFFIX))
        except OSError as exc:
            db.error = (
                f"deleted {data} but not its manifest ({exc.strerror}); "
                "the collector sweeps it at its next start"
            )
            break
    if db.deleted:
        try:
            fsync_dir(db.folder)
        except OSError as exc:
            db.error = db.error or f"cannot fsync {db.folder}: {exc.strerror}"
    if db.error:
        log.error("prune of agent=%s database=%s stopped: %s", db.agent, db.database, db.error)
    return not stopped


# -- presentation ----------------------------------------------------------------------------


def actions_table(run: PruneRun, dry_run: bool, verbose: bool) -> str | None:
    """One row per deletion (planned or done) and, if ``verbose``, per kept backup."""
    rows = []
    for db in run.databases:
        gone = [b.name for b in db.plan.delete] if dry_run else db.deleted
        rows += [
            ("would delete" if dry_run else "deleted", db.agent, db.database, name, REASON)
            for name in gone
        ]
        if verbose:
            rows += [
                ("keep", db.agent, db.database, b.name, ", ".join(db.plan.reasons[b.name]))
                for b in db.plan.keep
            ]
            rows += [
                ("keep", db.agent, db.database, name, "manifest unusable") for name in db.unjudged
            ]
    if not rows:
        return None
    return render_table(("ACTION", "AGENT", "DATABASE", "NAME", "REASON"), rows)


def summary_table(run: PruneRun, dry_run: bool) -> str:
    """Per database: kept, deleted (or to delete), capped, and undone if any."""
    undone = any(db.not_deleted for db in run.databases) and not dry_run
    headers = ["AGENT", "DATABASE", "KEPT", "TO DELETE" if dry_run else "DELETED", "CAPPED"]
    if undone:
        headers.append("NOT DELETED")
    rows: list[list[str]] = []
    totals = [0, 0, 0, 0]
    for db in run.databases:
        numbers = [
            db.kept,
            len(db.plan.delete) if dry_run else len(db.deleted),
            db.plan.capped,
            0 if dry_run else db.not_deleted,
        ]
        totals = [t + n for t, n in zip(totals, numbers, strict=True)]
        rows.append([db.agent, db.database, *map(str, numbers[: len(headers) - 2])])
    rows.append(["total", "", *map(str, totals[: len(headers) - 2])])
    lines = [render_table(headers, rows, right=range(2, len(headers)))]
    if any(db.plan.capped for db in run.databases):
        lines.append("capped: over max_deletions for this run; left for the next run")
    lines += [
        f"agent folder {name!r} is not in the configuration: left alone"
        for name in run.unconfigured_agents
    ]
    if dry_run:
        lines.append("dry run: nothing was deleted")
    return "\n".join(lines)
