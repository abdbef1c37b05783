"""`backhaul-agent drill`: prove the latest backup of a database restores, and say so.

The newest backup is restored (fetched and verified as :mod:`agent.restore.restore` does) into a
scratch database on the same server, ``backhaul_drill_<db>_<random>``, compared with
what was recorded when it was made, and the scratch database is dropped whatever
happens. The result goes to the collector as a REPORT of kind ``drill_ok`` or
``drill_failed``, where it is logged, counted in the drill metrics and, when failed,
alerted on.

What is compared
----------------

MySQL/MariaDB: each table's row count and ``CHECKSUM TABLE``, against the values the
backup recorded (``record_checksums``, off by default: it costs a full read). Those
values are read just before the dump, outside its snapshot, so they describe the dump
only if nothing was written in between. The backup therefore also records the
binary-log position before the checksums and after the dump (``binlog_unchanged``):

* unchanged: the server logged no write, the values must match exactly; any difference
  fails the drill;
* changed: the server logged writes (to any database) in that window, so a difference
  may be a write and not damage: the values are not compared and the drill passes on the
  restore alone, saying so;
* unknown (binary log off or not readable): the values are compared and a difference
  fails the drill, with a note that writes could not be ruled out.

Without recorded values only the number of tables is compared. The scratch database is
kept out of the binary log when the user may do that (SUPER or BINLOG ADMIN), so it
never reaches replicas.

MongoDB: each collection's document count against the count the dump wrote, which is
exact whatever the server did meanwhile.

PostgreSQL: ``pg_restore`` stops at the first error, and the restored tables are counted
against the TABLE entries the collector counted in the archive's table of contents. The
globals backup (roles) is not loaded into the server it came from: its drill fetches it
twice and proves it whole.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from agent.config import PG_GLOBALS, AgentConfig, SourceConfig
from agent.engines.adapters import MySQLAdapter, adapter_for
from agent.link.connection import CollectorClient
from agent.link.requests import list_backups, send_report
from agent.restore.mysql_schema import may_skip_binlog
from agent.restore.pg_loader import PostgresLoader, VerifyOnlyLoader
from agent.restore.restore import (
    MeterFactory,
    RestoreFailedError,
    choose_backup,
    loader_for,
    pick_source,
    restore_backup,
)
from agent.restore.targets import Loader, MongoLoader, MySQLLoader
from common.errors import BackhaulError, DumpError, ExitCode
from common.text import escape_control

log = logging.getLogger(__name__)
SCRATCH_PREFIX = "backhaul_drill_"  # a leading letter: valid on every server
_MAX_NAME = 63  # MongoDB allows 63 bytes, MySQL 64 characters
_SHOWN = 5


@dataclass(frozen=True)
class Comparison:
    """Whether a restored database matches what its backup recorded."""

    ok: bool
    message: str


@dataclass(frozen=True)
class DrillResult:
    """How a drill ended; ``reason`` is one word for metrics and alerts."""

    ok: bool
    reason: str
    message: str
    backup: str | None = None

    @property
    def exit_code(self) -> ExitCode:
        if self.ok:
            return ExitCode.OK
        if self.reason in ("mismatch", "integrity"):
            return ExitCode.INTEGRITY
        if self.reason in ("restore", "cleanup"):
            return ExitCode.DUMP
        return ExitCode.FAILED

    @classmethod
    def stopped_by(cls, exc: BackhaulError, backup: str | None) -> DrillResult:
        """The failed drill ``exc`` ended: the error's reason, except that the dump
        family's tools here are the restore's; a failed load counts by its cause."""
        cause = exc.cause if isinstance(exc, RestoreFailedError) else exc
        reason = "restore" if isinstance(cause, DumpError) else cause.reason
        return cls(False, reason, str(exc), backup)

    def line(self) -> str:
        status = "drill passed" if self.ok else f"DRILL FAILED ({self.reason})"
        return f"{status}: {escape_control(self.message, backslash=False)}"


def scratch_name(database: str, token: str | None = None) -> str:
    """``backhaul_drill_<db>_<random>``, safe on both engines whatever ``database`` is."""
    token = token or secrets.token_hex(4)
    safe = re.sub(r"[^A-Za-z0-9_]", "_", database)
    room = _MAX_NAME - len(SCRATCH_PREFIX) - len(token) - 1
    return f"{SCRATCH_PREFIX}{safe[:room]}_{token}"


def compare_tables(dump: dict[str, Any], restored: dict[str, dict[str, int]]) -> Comparison:
    """Compare restored tables with the values a MySQL backup recorded (see module doc)."""
    recorded = dump.get("checksums")
    tables = recorded.get("tables") if isinstance(recorded, dict) else None
    if not isinstance(tables, dict):
        expected = dump.get("tables")
        if isinstance(expected, int) and expected != len(restored):
            return Comparison(
                False, f"{len(restored)} tables restored, the backup recorded {expected}"
            )
        why = dump.get("checksums_skipped") or "record_checksums is off"
        return Comparison(
            True,
            f"{len(restored)} tables restored; no checksums were "
            f"recorded ({why}), so only the table count was compared",
        )
    unchanged = dump.get("binlog_unchanged")
    if unchanged is False:
        return Comparison(
            True,
            f"{len(restored)} tables restored; row counts and checksums "
            "not compared: the server logged writes between the "
            "checksums and the end of the dump",
        )
    problems = _table_differences(tables, restored)
    if not problems:
        return Comparison(
            True,
            f"{len(restored)} tables restored; row counts and CHECKSUM "
            "TABLE match the values recorded at dump time",
        )
    note = (
        ""
        if unchanged
        else "; the binary log is off, so writes during the backup cannot be ruled out"
    )
    return Comparison(
        False,
        f"{len(problems)} table(s) differ from the values recorded at "
        f"dump time: {'; '.join(problems[:_SHOWN])}{note}",
    )


def _table_differences(recorded: dict[str, Any], restored: dict[str, dict[str, int]]) -> list[str]:
    problems = [f"{_q(name)} missing" for name in sorted(set(recorded) - set(restored))]
    problems += [
        f"{_q(name)} not in the backup's record" for name in sorted(set(restored) - set(recorded))
    ]
    for name in sorted(set(recorded) & set(restored)):
        value = recorded[name]
        if not (isinstance(value, list) and len(value) == 2):
            problems.append(f"{_q(name)} has no usable record")
            continue
        rows, checksum = value
        got = restored[name]
        if got["rows"] != rows:
            problems.append(f"{_q(name)} has {got['rows']} rows, recorded {rows}")
        elif got["checksum"] != checksum:
            problems.append(f"{_q(name)} checksum {got['checksum']}, recorded {checksum}")
    return problems


def compare_collections(dump: dict[str, Any], restored: dict[str, int]) -> Comparison:
    """Compare restored document counts with those a MongoDB backup wrote."""
    collections = dump.get("collections")
    if not isinstance(collections, dict):
        return Comparison(False, "the backup's manifest records no collections")
    expected = {
        name: info.get("documents")
        for name, info in collections.items()
        if isinstance(info, dict) and info.get("type", "collection") == "collection"
    }
    problems = [f"{_q(name)} missing" for name in sorted(set(expected) - set(restored))]
    problems += [
        f"{_q(name)} not in the backup's record"
        for name in sorted(set(restored) - set(expected))
        if not name.startswith("system.")
    ]
    for name in sorted(set(expected) & set(restored)):
        if restored[name] != expected[name]:
            problems.append(
                f"{_q(name)} has {restored[name]} documents, the dump wrote {expected[name]}"
            )
    if problems:
        return Comparison(
            False, f"{len(problems)} collection(s) differ: {'; '.join(problems[:_SHOWN])}"
        )
    total = sum(v for v in expected.values() if isinstance(v, int))
    return Comparison(
        True,
        f"{len(expected)} collections, {total} documents restored; document counts match the dump",
    )


def _q(name: str) -> str:
    return escape_control(name)


async def run_drill(
    config: AgentConfig,
    database: str,
    source_name: str | None,
    client: CollectorClient,
    meter: MeterFactory | None = None,
) -> DrillResult:
    """Restore the newest backup of ``database`` into scratch, compare, drop, and report.

    Failures of the drill itself are the result, not exceptions; only a report that
    cannot reach the collector raises.

    Raises:
        ConfigError: unknown source, or several sources and none named.
        TransportError, RejectedError, RemoteProtocolError: the report was not delivered.
    """
    source = pick_source(config, source_name)
    result = await _drill(source, database, client, meter)
    log.log(
        logging.INFO if result.ok else logging.ERROR,
        "restore drill of %s/%s: %s",
        source.name,
        escape_control(database),
        result.line(),
    )
    await send_report(
        client,
        kind="drill_ok" if result.ok else "drill_failed",
        reason="ok" if result.ok else result.reason,
        message=(f"{result.backup}: " if result.backup else "") + result.message,
        database=database,
        source=source.name,
    )
    return result


async def _drill(
    source: SourceConfig, database: str, client: CollectorClient, meter: MeterFactory | None
) -> DrillResult:
    backup: str | None = None
    try:
        loader = await _loader(source, database)
        summaries = await list_backups(client, database)
        summary = choose_backup(summaries, database, source.engine)
        backup = str(summary["name"])
        scratch = await _free_scratch(loader, database)
    except BackhaulError as exc:
        return DrillResult.stopped_by(exc, backup)
    log.info("restore drill of %s into scratch database %s", backup, scratch)
    try:
        outcome = await restore_backup(client, summary, loader, scratch, replace=False, meter=meter)
        comparison = await _compare(loader, scratch, outcome.manifest)
        result = DrillResult(
            comparison.ok, "ok" if comparison.ok else "mismatch", comparison.message, backup
        )
    except BackhaulError as exc:
        result = DrillResult.stopped_by(exc, backup)
    finally:
        cleanup = await _drop(loader, scratch)
    if cleanup is not None:
        return DrillResult(False, "cleanup", f"{result.message}; {cleanup}", backup)
    return result


async def _compare_postgres(
    loader: PostgresLoader, scratch: str, manifest: dict[str, Any]
) -> Comparison:
    """The restored tables against the TABLE entries the collector counted in the archive."""
    tables = await asyncio.to_thread(loader.count_tables, scratch)
    verification = manifest.get("verification")
    archive = verification.get("pg_archive") if isinstance(verification, dict) else None
    listed = archive.get("tables") if isinstance(archive, dict) else None
    if not isinstance(listed, int):
        return Comparison(True, f"pg_restore loaded {tables} table(s) without an error "
                                "(the archive's table count was not recorded)")
    if listed != tables:
        return Comparison(False, f"the archive lists {listed} table(s), the restored "
                                 f"database holds {tables}")
    return Comparison(True, f"pg_restore loaded {tables} table(s), as the archive lists")


async def _loader(source: SourceConfig, database: str) -> Loader:
    if source.engine == "postgresql" and database == PG_GLOBALS:
        return VerifyOnlyLoader()
    adapter = adapter_for(source)
    skip = False
    if isinstance(adapter, MySQLAdapter):
        skip = await asyncio.to_thread(may_skip_binlog, adapter.params)
        if not skip:
            log.warning(
                "user %r may not keep the drill out of the binary log; the scratch "
                "database will reach replicas",
                adapter.params.user,
            )
    return loader_for(source, skip_binlog=skip)


async def _free_scratch(loader: Loader, database: str) -> str:
    for _ in range(5):
        name = scratch_name(database)
        if not (await loader.state(name)).exists:
            return name
    raise DumpError("could not find a free scratch database name")


async def _compare(loader: Loader, scratch: str, manifest: dict[str, Any]) -> Comparison:
    dump = manifest.get("dump") or {}
    if isinstance(loader, VerifyOnlyLoader):
        return Comparison(True, "globals backup verified whole (not loaded: its roles "
                                "would change this server)")
    if isinstance(loader, PostgresLoader):
        return await _compare_postgres(loader, scratch, manifest)
    if isinstance(loader, MySQLLoader):
        from agent.engines.mysql_inspect import table_checksums

        restored = await asyncio.to_thread(table_checksums, loader.params, scratch)
        return compare_tables(dump, restored)
    assert isinstance(loader, MongoLoader)
    counts = await asyncio.to_thread(loader.count_documents, scratch)
    return compare_collections(dump, counts)


async def _drop(loader: Loader, scratch: str) -> str | None:
    """Drop the scratch database; a message when that failed."""
    try:
        await loader.drop(scratch)
    except BackhaulError as exc:
        log.error("could not drop scratch database %s: %s", scratch, exc)
        return f"the scratch database {scratch} could not be dropped: {exc}"
    log.info("dropped scratch database %s", scratch)
    return None
