"""`backhaul-collector list` and `verify` as real processes, and the verify status reaching
the metrics of a serving collector (a real registry served over HTTP on loopback).

Backups are published with the storage API as in test_prune; corruption is made the way
it happens: a flipped byte, a truncated file, a damaged manifest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_prune import Site, Stored, run_collector

from collector.report.metrics import CollectorMetrics, serve_metrics
from collector.store.verify_status import STATUS_FILE, VerifyStatusReader
from tests.integration.harness import log_text

pytestmark = pytest.mark.integration

EXPECTED = {"db1": ["hospital", "sp ace"], "db2": ["billing"]}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    for days in (3, 2, 1):
        site.add("db1", "hospital", days)
    site.add("db1", "hospital", 1, repeat=True)
    site.add("db1", "sp ace", 1)
    site.add("db1", "sp ace", 0, verified=False)
    site.add("db2", "billing", 1)
    return site


def collector(site: Site, command: str, *args: str) -> tuple[int, str, str]:
    run = run_collector(command, "--config", str(site.config), *args)
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, run.stdout, run.stderr


def columns(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def backup_of(site: Site, database: str, index: int = 0) -> Stored:
    return [b for b in site.backups if b.database == database][index]


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o640)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def status(site: Site) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((site.deployment.store / STATUS_FILE).read_text())
    return result


def test_list_prints_one_row_per_backup(site: Site) -> None:
    """Agent, database, name, human size, start time in the collector's zone, verified."""
    code, out, _ = collector(site, "list")
    assert code == 0
    lines = out.splitlines()
    assert columns(lines[0]) == ["AGENT", "DATABASE", "NAME", "SIZE", "STARTED", "VERIFIED"]
    rows = [columns(line) for line in lines[1:-1]]
    assert {row[2] for row in rows} == {b.path.name for b in site.backups}
    for row in rows:
        stored = next(b for b in site.backups if b.path.name == row[2])
        assert row[:2] == [stored.agent, stored.database]
        assert row[3] == f"{stored.path.stat().st_size} B"
        assert row[4] == stored.backup.made_at.strftime("%Y-%m-%d %H:%M UTC")
        assert row[5] == ("yes" if stored.backup.verified else "no")
    assert lines[-1].startswith(f"{len(site.backups)} backup(s), ")


def test_list_filters_by_agent_and_database(site: Site) -> None:
    """--agent and --database narrow the listing; odd database names are shown decoded."""
    code, out, _ = collector(site, "list", "--agent", "db1", "--database", "sp ace")
    assert code == 0
    rows = [columns(line) for line in out.splitlines()[1:-1]]
    assert [row[1] for row in rows] == ["sp ace", "sp ace"]
    assert all(row[2].startswith("sp%20ace_") for row in rows)
    code, out, _ = collector(site, "list", "--agent", "db2")
    assert {columns(line)[0] for line in out.splitlines()[1:-1]} == {"db2"}


def test_list_of_an_unknown_agent_is_refused(site: Site) -> None:
    """A mistyped agent is an error, not an empty list that looks like lost backups."""
    code, _, err = collector(site, "list", "--agent", "db9")
    assert code == 2 and "db9" in err


def test_verify_all_reports_ok_and_records_a_clean_status(site: Site) -> None:
    """An intact store: one OK line per backup, exit 0, a status file without findings."""
    code, out, _ = collector(site, "verify", "--all")
    assert code == 0, out
    ok_lines = [line for line in out.splitlines() if line.startswith("OK ")]
    assert len(ok_lines) == len(site.backups)
    assert out.splitlines()[-1] == f"{len(site.backups)} backup(s) checked, 0 mismatch(es)"
    recorded = status(site)
    assert recorded["mismatches"] == []
    assert recorded["last_run"]["checked"] == 7


def test_a_flipped_byte_is_a_mismatch_logged_and_recorded(site: Site) -> None:
    """Bit rot in one file: MISMATCH for it alone, exit 7, a log line, the status file."""
    rotten = backup_of(site, "hospital", 1)
    flip_byte(rotten.path, rotten.path.stat().st_size // 2)
    code, out, _ = collector(site, "verify", "--all")
    assert code == 7
    mismatches = [line for line in out.splitlines() if line.startswith("MISMATCH")]
    assert len(mismatches) == 1
    assert f"db1/hospital/{rotten.path.name}: " in mismatches[0]
    assert "SHA-256 is" in mismatches[0]
    assert sum(line.startswith("OK ") for line in out.splitlines()) == len(site.backups) - 1
    logged = log_text(site.deployment.collector_logs)
    assert f"verify mismatch agent=db1 database=hospital name={rotten.path.name}" in logged
    (finding,) = status(site)["mismatches"]
    assert finding["agent"] == "db1" and finding["database"] == "hospital"
    assert finding["name"] == rotten.path.name
    _, listing, _ = collector(site, "list", "--agent", "db1", "--database", "hospital")
    row = next(columns(line) for line in listing.splitlines() if rotten.path.name in line)
    assert row[-1] == "MISMATCH"


def test_a_truncated_file_is_a_mismatch(site: Site) -> None:
    """A short file fails on size, checksum and the unfinished compression stream."""
    short = backup_of(site, "billing")
    short.path.chmod(0o640)
    data = short.path.read_bytes()
    short.path.write_bytes(data[: len(data) - 10])
    code, out, _ = collector(site, "verify", "--agent", "db2")
    assert code == 7
    (line,) = [line for line in out.splitlines() if line.startswith("MISMATCH")]
    assert f"size is {len(data) - 10} bytes, manifest says {len(data)}" in line
    assert "truncated" in line or "corrupt" in line


def test_a_damaged_manifest_is_a_mismatch(site: Site) -> None:
    """Without a readable manifest nothing can be proven: the backup is reported."""
    broken = backup_of(site, "billing")
    manifest = broken.path.with_name(broken.path.name + ".manifest.json")
    manifest.chmod(0o640)
    manifest.write_text("{ not json")
    code, out, _ = collector(site, "verify", "--agent", "db2", "--database", "billing")
    assert code == 7
    assert f"MISMATCH  db2/billing/{broken.path.name}: manifest missing or unreadable" in out


def test_a_scoped_run_keeps_findings_outside_its_scope(site: Site) -> None:
    """verify --agent db2 does not clear a db1 finding; a db1 run after repair does."""
    rotten = backup_of(site, "hospital")
    flip_byte(rotten.path, 20)
    assert collector(site, "verify", "--all")[0] == 7
    assert collector(site, "verify", "--agent", "db2")[0] == 0
    assert [f["name"] for f in status(site)["mismatches"]] == [rotten.path.name]
    rotten.path.unlink()
    rotten.path.with_name(rotten.path.name + ".manifest.json").unlink()
    assert collector(site, "verify", "--agent", "db1", "--database", "hospital")[0] == 0
    assert status(site)["mismatches"] == []


def test_verify_needs_a_scope(site: Site) -> None:
    """Neither --all nor --agent, or --database without --agent, is a usage error."""
    assert collector(site, "verify")[0] == 2
    assert collector(site, "verify", "--database", "hospital")[0] == 2
    code, _, err = collector(site, "verify", "--all", "--database", "hospital")
    assert code == 2 and "--database needs --agent" in err
    assert collector(site, "verify", "--all", "--agent", "db1")[0] == 2


def test_a_corrupt_backup_does_not_hold_the_retention_floor(site: Site) -> None:
    """Once verify finds the newest backup corrupt, prune keeps an older good one instead."""
    newest = backup_of(site, "billing")
    older = site.add("db2", "billing", 30)
    oldest = site.add("db2", "billing", 60)
    flip_byte(newest.path, 20)
    assert collector(site, "verify", "--agent", "db2")[0] == 7
    code, out, _ = collector(site, "prune", "--dry-run", "--agent", "db2", "--show-kept")
    assert code == 0
    kept = {
        columns(line)[3]: columns(line)[4] for line in out.splitlines() if line.startswith("keep")
    }
    assert "last-3" in kept[older.path.name] and "last-3" in kept[oldest.path.name]
    assert "last-3" not in kept[newest.path.name]


async def scrape(url: str) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "backhaul_verify_mismatches_total":
                values[(sample.labels["agent"], sample.labels["database"])] = sample.value
    return values


async def test_the_serving_collector_counts_each_run_s_findings(site: Site) -> None:
    """The reader turns a verify run's findings into backhaul_verify_mismatches_total."""
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, EXPECTED, site.deployment.store)
    registry.register(VerifyStatusReader(site.deployment.store, metrics.verify_mismatch))
    pair = ("db1", "hospital")
    async with await serve_metrics(registry, "127.0.0.1", 0) as server:
        assert (await scrape(server.url))[pair] == 0
        assert collector(site, "verify", "--all")[0] == 0
        assert (await scrape(server.url))[pair] == 0
        flip_byte(backup_of(site, "hospital").path, 20)
        assert collector(site, "verify", "--all")[0] == 7
        await scrape(server.url)  # reads the new status; the count shows at the next scrape
        counts = await scrape(server.url)
        assert counts[pair] == 1
        assert counts[("db2", "billing")] == 0 and counts[("db1", "sp ace")] == 0
        assert (await scrape(server.url))[pair] == 1  # counted once per run
        assert collector(site, "verify", "--agent", "db1")[0] == 7
        await scrape(server.url)
        assert (await scrape(server.url))[pair] == 2  # still corrupt: counted again


def test_a_restarted_collector_counts_standing_findings_once(site: Site) -> None:
    """A finding made while the collector was down reaches the counter, once."""
    flip_byte(backup_of(site, "hospital").path, 20)
    assert collector(site, "verify", "--all")[0] == 7
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, EXPECTED, site.deployment.store)
    reader = VerifyStatusReader(site.deployment.store, metrics.verify_mismatch)
    registry.register(reader)
    labels = {"agent": "db1", "database": "hospital"}
    first = generate_latest(registry).decode()
    assert 'backhaul_verify_mismatches_total{agent="db1",database="hospital"} 0.0' in first
    generate_latest(registry)
    assert registry.get_sample_value("backhaul_verify_mismatches_total", labels) == 1
    assert reader.refresh() == 0


def test_a_finding_for_a_deleted_backup_is_not_counted(site: Site) -> None:
    """A corrupt backup deleted since the run no longer raises the counter."""
    rotten = backup_of(site, "hospital")
    flip_byte(rotten.path, 20)
    assert collector(site, "verify", "--all")[0] == 7
    rotten.path.unlink()
    counted: list[tuple[str, str]] = []
    reader = VerifyStatusReader(site.deployment.store, lambda a, d: counted.append((a, d)))
    assert reader.refresh() == 0 and counted == []
