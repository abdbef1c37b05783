"""`backhaul-collector prune` as a real process over a store filled through the storage API.

Backups are published with collector.store.files.Upload exactly as the session does (small but
valid zstd SQL dumps, manifests with UTC start times) for days spread over 400 days, some
unverified, some same-day repeats (`-2`). The expected plan is computed here from what the
test itself stored, with the pure policy, and compared with what the command deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.store.files import Store, StoredBackup
from collector.store.retention import Backup, RetentionPolicy, plan
from common.compression import make_compressor
from tests.integration.harness import Deployment, log_text, stored_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
POLICY = RetentionPolicy(
    keep_daily=7,
    keep_weekly=4,
    keep_monthly=6,
    keep_within_days=2,
    keep_last=3,
    max_deletions=100,
)


def retention_toml(policy: RetentionPolicy) -> str:
    return textwrap.dedent(f"""
        [retention]
        keep_daily = {policy.keep_daily}
        keep_weekly = {policy.keep_weekly}
        keep_monthly = {policy.keep_monthly}
        keep_within_days = {policy.keep_within_days}
        keep_last = {policy.keep_last}
        max_deletions = {policy.max_deletions}
    """)


def sql_dump(marker: str) -> bytes:
    """A small zstd SQL dump with the trailer mariadb-dump writes last."""
    text = (
        "-- MariaDB dump 10.19\n"
        "CREATE TABLE `t` (`id` varchar(200));\n"
        f"INSERT INTO `t` VALUES ('{marker}');\n"
        f"-- Dump completed on {marker}\n"
    )
    compressor = make_compressor("zstd")
    return compressor.compress(text.encode()) + compressor.flush()


def store_backup(
    store: Store,
    agent: str,
    database: str,
    started: datetime,
    *,
    verified: bool = True,
    size_offset: int = 0,
) -> StoredBackup:
    """Publish one backup through the storage API, with a manifest like the session's."""
    payload = sql_dump(f"{agent}/{database}/{started.isoformat()}")
    upload = store.begin(agent, database, "sql.zst")
    upload.write(payload)
    manifest: dict[str, Any] = {
        "manifest_version": 1,
        "agent": agent,
        "database": database,
        "source": "main",
        "engine": "mysql",
        "format": "sql",
        "compression": "zstd",
        "size": len(payload) + size_offset,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "started_at": started.isoformat(),
        "stored_at": (started + timedelta(minutes=5)).isoformat(),
        "timezone": "UTC",
        "verified": verified,
        "verification": {"sha256": True, "byte_count": True, "stream_complete": True},
        "dump": {},
        "backup_id": hashlib.sha256(started.isoformat().encode()).hexdigest()[:16],
    }
    return upload.commit(started.date(), manifest)


@dataclass
class Stored:
    """What the test stored, as retention should see it."""

    agent: str
    database: str
    path: Path
    backup: Backup


class Site:
    """A collector configuration and a store the test fills."""

    def __init__(self, tmp_path: Path, policy: RetentionPolicy = POLICY) -> None:
        self.deployment = Deployment(tmp_path)
        for agent in ("db1", "db2"):
            self.deployment.add_agent(agent)
        self.config = self.deployment.collector_toml(extra=retention_toml(policy))
        self.policy = policy
        self.store = Store(self.deployment.store)
        self.store.ensure_root()
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.backups: list[Stored] = []

    def add(
        self,
        agent: str,
        database: str,
        days_ago: int,
        *,
        verified: bool = True,
        size_offset: int = 0,
        repeat: bool = False,
    ) -> Stored:
        # Three hours off the whole day keeps every backup far from the keep_within cutoff.
        started = self.now - timedelta(days=days_ago, hours=3)
        if repeat:
            later = started + timedelta(seconds=30)
            started = later if later.date() == started.date() else started - timedelta(seconds=30)
        stored = store_backup(
            self.store, agent, database, started, verified=verified, size_offset=size_offset
        )
        item = Stored(
            agent,
            database,
            stored.path,
            Backup(stored.name, started, started.date(), verified and not size_offset),
        )
        self.backups.append(item)
        return item

    def expected_deletions(self, policy: RetentionPolicy | None = None) -> set[Path]:
        """The data files the pure policy deletes, from what the test stored."""
        deleted: set[Path] = set()
        for agent, database in {(b.agent, b.database) for b in self.backups}:
            if agent not in ("db1", "db2"):
                continue
            mine = [b for b in self.backups if (b.agent, b.database) == (agent, database)]
            result = plan([b.backup for b in mine], policy or self.policy, self.now)
            names = {b.name for b in result.delete}
            deleted |= {b.path for b in mine if b.backup.name in names}
        return deleted

    def prune(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_collector("prune", "--config", str(self.config), *args)


def run_collector(*args: str) -> subprocess.CompletedProcess[str]:
    """`backhaul-collector ...` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "collector.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )


def fill(site: Site) -> None:
    """Two years of mixed history for db1/hospital, an old-only database, a second agent,
    and the folder of an agent that is no longer configured."""
    for days in [*range(0, 15), *range(15, 400, 9)]:
        site.add(
            "db1",
            "hospital",
            days,
            verified=days not in (0, 5, 33, 204),
            size_offset=1 if days == 12 else 0,
        )
    site.add("db1", "hospital", 1, repeat=True)
    site.add("db1", "hospital", 42, repeat=True)
    for days in range(300, 390, 10):
        site.add("db1", "sp ace", days)
    for days in range(0, 120, 3):
        site.add("db2", "billing", days)
    for days in range(100, 400, 20):
        site.add("old", "legacy", days)


def columns(line: str) -> list[str]:
    """Cells of a table row: columns are two or more spaces apart, names have at most one."""
    return re.split(r" {2,}", line.strip())


def all_files(site: Site) -> set[Path]:
    return {site.deployment.store / p for p in stored_files(site.deployment.store)}


def manifest_of(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def test_dry_run_prints_the_plan_and_deletes_nothing(tmp_path: Path) -> None:
    """--dry-run lists exactly what a real run would delete and leaves every file."""
    site = Site(tmp_path)
    fill(site)
    before = all_files(site)
    expected = site.expected_deletions()
    assert expected, "the scenario must give the policy something to delete"
    run = site.prune("--dry-run")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    planned = {
        line.split()[-2] for line in run.stdout.splitlines() if line.startswith("would delete")
    }
    assert planned == {p.name for p in expected}
    assert "dry run: nothing was deleted" in run.stdout
    assert "TO DELETE" in run.stdout
    assert all_files(site) == before
    assert "deleted backup" not in log_text(site.deployment.collector_logs)


def test_prune_deletes_exactly_the_plan_and_logs_each_deletion(tmp_path: Path) -> None:
    """A real run removes the planned data files and manifests, keeps the floor, logs all."""
    site = Site(tmp_path)
    fill(site)
    before = all_files(site)
    expected = site.expected_deletions()
    run = site.prune()
    assert run.returncode == 0, run.stderr
    gone = before - all_files(site)
    assert gone == expected | {manifest_of(p) for p in expected}
    for agent, database in (("db1", "hospital"), ("db1", "sp ace"), ("db2", "billing")):
        verified = [
            b
            for b in site.backups
            if (b.agent, b.database) == (agent, database) and b.backup.verified
        ]
        newest = sorted(verified, key=lambda b: b.backup.made_at)[-POLICY.keep_last :]
        assert all(b.path.exists() for b in newest), f"floor of {agent}/{database}"
    assert all(b.path.exists() for b in site.backups if b.agent == "old")
    assert "agent folder 'old' is not in the configuration: left alone" in run.stdout
    logged = [
        line
        for line in log_text(site.deployment.collector_logs).splitlines()
        if "deleted backup" in line
    ]
    assert len(logged) == len(expected)
    for path in expected:
        line = next(line for line in logged if f"name={path.name} " in line)
        agent = path.parents[1].name
        assert f"agent={agent} " in line and "reason=retention" in line


def test_summary_counts_kept_deleted_and_capped(tmp_path: Path) -> None:
    """The summary table's numbers match what was stored and what went."""
    site = Site(tmp_path)
    fill(site)
    expected = site.expected_deletions()
    run = site.prune()
    assert run.returncode == 0, run.stderr
    rows = [columns(line) for line in run.stdout.splitlines() if line.startswith(("db1 ", "db2 "))]
    assert {tuple(row[:2]) for row in rows} == {
        ("db1", "hospital"),
        ("db1", "sp ace"),
        ("db2", "billing"),
    }
    for agent, database, *numbers in rows:
        mine = [b for b in site.backups if (b.agent, b.database) == (agent, database)]
        deleted = [b for b in mine if b.path in expected]
        assert numbers == [str(len(mine) - len(deleted)), str(len(deleted)), "0"], agent
    total = next(line for line in run.stdout.splitlines() if line.startswith("total"))
    assert columns(total)[1:] == [
        str(len(site.backups) - len(expected) - sum(b.agent == "old" for b in site.backups)),
        str(len(expected)),
        "0",
    ]


def test_a_second_run_finds_nothing_more_to_delete(tmp_path: Path) -> None:
    """Retention is stable: what one run keeps, the next run keeps too."""
    site = Site(tmp_path)
    fill(site)
    assert site.prune().returncode == 0
    after_first = all_files(site)
    run = site.prune()
    assert run.returncode == 0, run.stderr
    assert all_files(site) == after_first
    assert "deleted  " not in run.stdout


def test_max_deletions_caps_a_run_oldest_first(tmp_path: Path) -> None:
    """Only max_deletions backups go per run, the oldest candidates; the rest are counted."""
    capped_policy = RetentionPolicy(
        keep_daily=7,
        keep_weekly=4,
        keep_monthly=6,
        keep_within_days=2,
        keep_last=3,
        max_deletions=3,
    )
    site = Site(tmp_path, capped_policy)
    for days in range(0, 60):
        site.add("db1", "hospital", days)
    uncapped = site.expected_deletions(POLICY)
    expected = site.expected_deletions()
    assert len(expected) == 3 and len(uncapped) > 3
    oldest = sorted(uncapped, key=lambda p: p.name)[:3]
    assert expected == set(oldest)
    run = site.prune()
    assert run.returncode == 0, run.stderr
    assert not any(p.exists() for p in oldest)
    assert all(p.exists() for p in uncapped - set(oldest))
    row = next(line for line in run.stdout.splitlines() if line.startswith("db1 "))
    assert columns(row)[2:] == [str(60 - 3), "3", str(len(uncapped) - 3)]
    assert "capped: over max_deletions" in run.stdout


def test_unverified_or_resized_backups_do_not_hold_the_floor(tmp_path: Path) -> None:
    """Only backups verified at ingest and still of their manifest's size count as verified."""
    policy = RetentionPolicy(
        keep_daily=0,
        keep_weekly=0,
        keep_monthly=0,
        keep_within_days=0,
        keep_last=2,
        max_deletions=100,
    )
    site = Site(tmp_path, policy)
    oldest = site.add("db1", "hospital", 50)
    good = site.add("db1", "hospital", 40)
    resized = site.add("db1", "hospital", 30, size_offset=7)
    newest_good = site.add("db1", "hospital", 20)
    unverified = site.add("db1", "hospital", 10, verified=False)
    run = site.prune()
    assert run.returncode == 0, run.stderr
    assert not oldest.path.exists() and not resized.path.exists()
    assert good.path.exists() and newest_good.path.exists()
    assert unverified.path.exists()  # newer than the newest verified one


def test_a_backup_whose_manifest_cannot_be_read_is_kept(tmp_path: Path) -> None:
    """Prune never deletes what it cannot judge."""
    policy = RetentionPolicy(
        keep_daily=0,
        keep_weekly=0,
        keep_monthly=0,
        keep_within_days=0,
        keep_last=1,
        max_deletions=100,
    )
    site = Site(tmp_path, policy)
    broken = site.add("db1", "hospital", 30)
    site.add("db1", "hospital", 20)
    manifest = manifest_of(broken.path)
    manifest.chmod(0o640)
    manifest.write_text('{"sha256": "not json')
    run = site.prune()
    assert run.returncode == 0, run.stderr
    assert broken.path.exists()


def test_an_unknown_agent_is_refused(tmp_path: Path) -> None:
    """A mistyped --agent is a usage error, not a silent no-op."""
    site = Site(tmp_path)
    run = site.prune("--agent", "db9", "--dry-run")
    assert run.returncode == 2
    assert "db9" in run.stderr and "Traceback" not in run.stderr


def test_agent_and_database_filters_limit_the_run(tmp_path: Path) -> None:
    """--agent/--database prune only that database."""
    site = Site(tmp_path)
    fill(site)
    expected = {p for p in site.expected_deletions() if p.parent.name == "hospital"}
    before = all_files(site)
    run = site.prune("--agent", "db1", "--database", "hospital")
    assert run.returncode == 0, run.stderr
    assert before - all_files(site) == expected | {manifest_of(p) for p in expected}


def test_a_second_prune_at_the_same_time_is_refused(tmp_path: Path) -> None:
    """While one prune holds the lock, another deletes nothing and says why."""
    site = Site(tmp_path)
    fill(site)
    before = all_files(site)
    fd = os.open(site.deployment.store / ".prune.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = site.prune()
    finally:
        os.close(fd)
    assert run.returncode == 6
    assert "another prune is running" in run.stderr
    assert all_files(site) - {site.deployment.store / ".prune.lock"} == before
