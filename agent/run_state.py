"""What the agent remembers of each database between starts: the last scheduled run the
service handled and the last backup that succeeded, one small JSON file per database.

Layout: ``<state_dir>/runs/<source>/<database>.json`` (names in the reversible file-name
encoding of :func:`common.naming.encode_database`), for example::

    {"version": 1, "source": "main", "database": "hospital",
     "last_scheduled": "2026-11-26T01:30:00+00:00",
     "last_success": "2026-11-26T01:31:12+00:00"}

A file is replaced atomically (temporary file, fsync, rename, fsync of the folder), so a
crash leaves the old record or the new one. One file per database means writers of
different databases never race; writers of one database hold its lock
(:mod:`agent.db_lock`). The state only decides whether a missed run is made up, so it
never stops a backup: a missing, unreadable or corrupt record is a warning and a fresh
start for that database, and a record that cannot be written is a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.shared_dirs import make_shared_folder
from common.fsutil import give_to_folder_owner
from common.naming import decode_database, encode_database

log = logging.getLogger(__name__)
VERSION = 1
_MAX_BYTES = 64 * 1024  # a record is ~200 bytes; anything larger is not ours


@dataclass(frozen=True)
class RunRecord:
    """One database's history, as far as catching up needs it (UTC-aware times)."""

    source: str
    database: str
    last_scheduled: datetime | None = None
    last_success: datetime | None = None


class RunState:
    """The records under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "runs"

    def path(self, source: str, database: str) -> Path:
        return self.root / encode_database(source) / f"{encode_database(database)}.json"

    def load(self, source: str, database: str) -> RunRecord | None:
        """The record of one database; None (after a warning when it was damaged) when
        there is none to trust."""
        path = self.path(source, database)
        try:
            with path.open("rb") as handle:
                raw = handle.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the run record %s (%s): starting afresh for %s/%s",
                        path, exc.strerror, source, database)
            return None
        try:
            return _parse(raw, source, database)
        except ValueError as exc:
            log.warning("the run record %s is damaged (%s): starting afresh for %s/%s",
                        path, exc, source, database)
            return None

    def databases(self, source: str) -> list[str]:
        """The databases of ``source`` that have a record file (damaged ones included)."""
        folder = self.root / encode_database(source)
        try:
            names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot list the run records in %s: %s", folder, exc.strerror)
            return []
        found = []
        for name in names:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                found.append(decode_database(name.removesuffix(".json")))
        return found

    def record(
        self,
        source: str,
        database: str,
        *,
        scheduled: datetime | None = None,
        success: datetime | None = None,
    ) -> None:
        """Note a handled scheduled run and/or a success; a write failure is a warning."""
        current = self.load(source, database) or RunRecord(source, database)
        updated = current
        if scheduled is not None:
            updated = replace(updated, last_scheduled=scheduled.astimezone(UTC))
        if success is not None:
            updated = replace(updated, last_success=success.astimezone(UTC))
        path = self.path(source, database)
        try:
            _write_atomically(path, _dump(updated), self.state_dir)
        except OSError as exc:
            log.warning("cannot write the run record %s (%s): a run missed while the "
                        "service is down may not be made up", path, exc.strerror or exc)


def _dump(record: RunRecord) -> bytes:
    data = {
        "version": VERSION,
        "source": record.source,
        "database": record.database,
        "last_scheduled": _time_text(record.last_scheduled),
        "last_success": _time_text(record.last_success),
    }
    return (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode()


def _time_text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _parse(raw: bytes, source: str, database: str) -> RunRecord:
    """Raises ValueError saying what is wrong."""
    if len(raw) > _MAX_BYTES:
        raise ValueError("too large")
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} record")
    if (data.get("source"), data.get("database")) != (source, database):
        raise ValueError("it names another database")
    return RunRecord(source, database, _time(data, "last_scheduled"), _time(data, "last_success"))


def _time(data: dict[str, Any], key: str) -> datetime | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{key} is not a time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{key} has no time zone")
    return moment


def _write_atomically(path: Path, content: bytes, state_dir: Path) -> None:
    make_shared_folder(path.parent, state_dir)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            give_to_folder_owner(fd, state_dir)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)

