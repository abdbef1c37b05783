"""What the store holds and whether it is still intact: listing, re-verification of stored
files against their manifests, and the status file through which `serve` learns of bit rot.

Re-verification reads every selected backup to its end: byte count and SHA-256 against the
manifest, the compression stream decoded to its end, and the dump format's completeness
mark (the checks of ingest, in :mod:`collector.verify`). A data file whose manifest is
missing or unreadable is a mismatch too: without it nothing can be proven.

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
its scope and keeps the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from collector.storage import iter_backups
from collector.verify import FORMAT_CHECKS
from common.compression import StreamChecker
from common.errors import ConfigError, IntegrityError, StorageError
from common.logsetup import escape_control
from common.naming import MANIFEST_SUFFIX, decode_database, encode_database, parse_backup_name

log = logging.getLogger(__name__)

STATUS_FILE = ".verify-status.json"
STATUS_LOCK = ".verify-status.lock"
STATUS_VERSION = 1
STATUS_MODE = 0o640  # the serving collector (same user) reads it; the admin group may too
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


def check_agent_name(name: str) -> None:
    """Refuse an agent name that collector.toml would refuse (and any path trickery).

    Raises:
        ConfigError: naming the option.
    """
    if not name or name[0] in ".-" or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"--agent {name!r} is not a valid agent name")


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
    expected_size, expected_sha = entry.manifest.get("size"), entry.manifest.get("sha256")
    reasons: list[str] = []
    stream = _StreamCheck(entry.manifest, max_ratio)
    sha = hashlib.sha256()
    size = 0
    try:
        with open(entry.path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                sha.update(chunk)
                size += len(chunk)
                stream.feed(chunk)
    except FileNotFoundError:
        if _manifest_follows(entry):
            return Check(entry, GONE)
        return Check(entry, MISMATCH, ("data file deleted but its manifest left",))
    except PermissionError as exc:
        raise StorageError(f"cannot read {entry.path}: {exc.strerror}") from None
    except OSError as exc:
        return Check(entry, MISMATCH, (f"read error: {exc.strerror or exc}",))
    if not isinstance(expected_size, int) or isinstance(expected_size, bool):
        reasons.append("manifest has no size")
    elif size != expected_size:
        reasons.append(f"size is {size} bytes, manifest says {expected_size}")
    if not isinstance(expected_sha, str):
        reasons.append("manifest has no SHA-256")
    elif sha.hexdigest() != expected_sha:
        reasons.append(
            f"SHA-256 is {sha.hexdigest()[:16]}..., manifest says {expected_sha[:16]}..."
        )
    reasons.extend(stream.finish())
    return Check(entry, MISMATCH if reasons else OK, tuple(reasons))


def _manifest_follows(entry: Entry, wait: float = 1.0) -> bool:
    """Whether the manifest goes too within ``wait`` seconds, as when prune deletes."""
    manifest = entry.path.with_name(entry.name + MANIFEST_SUFFIX)
    deadline = time.monotonic() + wait
    while manifest.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _StreamCheck:
    """Decodes the compression stream and runs the format check; keeps the first problem."""

    def __init__(self, manifest: Mapping[str, Any], max_ratio: int | None) -> None:
        self.problem: str | None = None
        self._checker: StreamChecker | None = None
        compression, fmt = manifest.get("compression"), manifest.get("format")
        make_format = FORMAT_CHECKS.get(fmt) if isinstance(fmt, str) else None
        if make_format is None:
            self.problem = f"manifest names an unknown format {fmt!r}"
            return
        self._format = make_format()
        try:
            self._checker = StreamChecker(
                str(compression), sink=self._format.feed, max_ratio=max_ratio
            )
        except ValueError:
            self.problem = f"manifest names an unknown compression {compression!r}"

    def feed(self, chunk: bytes) -> None:
        if self._checker is None or self.problem is not None:
            return
        try:
            self._checker.feed(chunk)
        except IntegrityError as exc:
            self.problem = str(exc)

    def finish(self) -> list[str]:
        if self._checker is not None and self.problem is None:
            try:
                self._checker.finish()
                if self._checker.output_bytes == 0:
                    raise IntegrityError("backup is empty once decompressed")
                self._format.finish(self._checker.tail)
            except IntegrityError as exc:
                self.problem = str(exc)
        return [] if self.problem is None else [self.problem]


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
        _record(root, scope, run, started)
    log.info(
        "verify run %s: %d backup(s) checked, %d mismatch(es)",
        run_id,
        len(checks),
        len(run.mismatches),
    )
    return run


# -- the status file -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyStatus:
    """What the status file says: the last run and the findings still standing."""

    last_run: Mapping[str, Any]
    findings: list[Finding]

    def mismatched(self) -> set[tuple[str, str, str, str]]:
        """Keys (agent, database, name, manifest SHA-256) of backups found corrupt."""
        return {(f.agent, f.database, f.name, f.sha256) for f in self.findings}


def entry_key(entry: Entry) -> tuple[str, str, str, str]:
    """The key of ``entry`` in :meth:`VerifyStatus.mismatched`."""
    return entry.agent, entry.database, entry.name, entry.manifest_sha256


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


def _record(root: Path, scope: Scope, run: VerifyRun, started: datetime) -> None:
    with file_lock(root, STATUS_LOCK):  # two runs of different scopes must not lose findings
        _merge_status(root, scope, run, started)


def _merge_status(root: Path, scope: Scope, run: VerifyRun, started: datetime) -> None:
    previous = load_status_or_warn(root)
    kept = (
        [f for f in previous.findings if not scope.covers(f.agent, f.database)]
        if previous is not None
        else []
    )
    now = datetime.now(UTC).isoformat()
    new = [
        Finding(
            run.run_id,
            now,
            c.entry.agent,
            c.entry.database,
            c.entry.name,
            c.entry.manifest_sha256,
            "; ".join(c.reasons),
        )
        for c in run.mismatches
    ]
    status = {
        "version": STATUS_VERSION,
        "last_run": {
            "id": run.run_id,
            "started_at": started.isoformat(),
            "finished_at": now,
            "scope": asdict(scope),
            "checked": len(run.checks),
            "mismatched": len(new),
        },
        "mismatches": [asdict(f) for f in [*kept, *new]],
    }
    _write_atomically(root, STATUS_FILE, json.dumps(status, indent=2).encode())


def _write_atomically(root: Path, name: str, content: bytes) -> None:
    temp = root / f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STATUS_MODE)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, STATUS_MODE)
            _give_to_store_owner(fd, root)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, root / name)
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"cannot write {root / name}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


@contextlib.contextmanager
def file_lock(root: Path, name: str, *, wait: bool = True, busy: str = "") -> Iterator[None]:
    """Hold an flock on ``<root>/<name>``; with ``wait=False`` fail at once if it is held,
    saying ``busy``.

    Raises:
        StorageError: the lock file cannot be opened, or it is held and ``wait`` is False.
    """
    path = root / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, STATUS_MODE)
    except OSError as exc:
        raise StorageError(f"cannot open the lock {path}: {exc.strerror}") from None
    try:
        _give_to_store_owner(fd, root)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(busy or f"another process holds {path}") from None
        yield
    finally:
        os.close(fd)


def _give_to_store_owner(fd: int, root: Path) -> None:
    if os.geteuid() == 0:  # run by root: leave the file to the collector's user
        st = os.stat(root)
        os.fchown(fd, st.st_uid, st.st_gid)


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


# -- presentation ----------------------------------------------------------------------------


def human_size(size: int) -> str:
    """1536 -> '1.5 KiB'; binary units, as `ls -lh` and `du -h` use."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def total_size(entries: Iterable[Entry]) -> int:
    """Bytes of the data files of ``entries`` that still exist."""
    total = 0
    for entry in entries:
        with contextlib.suppress(OSError):
            total += entry.path.stat().st_size
    return total


def counts_as_verified(entry: Entry, mismatched: set[tuple[str, str, str, str]]) -> bool:
    """Verified at ingest, the data file still of the manifest's size, and not found
    corrupt by the last verify run that covered it."""
    if entry.manifest is None or entry.manifest.get("verified") is not True:
        return False
    try:
        size = entry.path.stat().st_size
    except OSError:
        return False
    return size == entry.manifest.get("size") and entry_key(entry) not in mismatched


def started_at(entry: Entry) -> datetime | None:
    """The manifest's ``started_at`` as an aware datetime; None if missing or naive."""
    text = entry.manifest.get("started_at") if entry.manifest is not None else None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None and moment.utcoffset() is not None else None


LIST_HEADERS = ("AGENT", "DATABASE", "NAME", "SIZE", "STARTED", "VERIFIED")


def listing_rows(
    entries: Sequence[Entry], status: VerifyStatus | None, zone: tzinfo
) -> list[tuple[str, ...]]:
    """One row per backup for ``backhaul-collector list``."""
    mismatched = status.mismatched() if status is not None else set()
    rows: list[tuple[str, ...]] = []
    for entry in entries:
        try:
            size = human_size(entry.path.stat().st_size)
        except OSError:
            size = "?"
        moment = started_at(entry)
        when = (
            moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
            if moment
            else entry.day.isoformat()
        )
        if entry.manifest is None:
            verified = "no manifest"
        elif entry_key(entry) in mismatched:
            verified = MISMATCH
        else:
            verified = "yes" if counts_as_verified(entry, mismatched) else "no"
        rows.append((entry.agent, entry.database, entry.name, size, when, verified))
    return rows


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()
) -> str:
    """Plain text columns separated by two spaces; ``right`` lists right-aligned columns."""
    body = [[escape_control(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in aligned else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in body)])


def format_check(check: Check) -> str:
    """One line of `verify` output: status, agent/database/name and the reasons."""
    entry = check.entry
    line = f"{check.status:<8}  {entry.agent}/{entry.database}/{entry.name}"
    if check.status == GONE:
        line += ": deleted while verify was running"
    elif check.reasons:
        line += ": " + "; ".join(check.reasons)
    return escape_control(line)
