"""Files on the backup host: temporary upload, atomic no-replace publish, manifests.

Layout: `<root>/<agent>/<encoded db>/<encoded db>_<yyyymmdd>[-N].<ext>` with
`<that name>.manifest.json` beside it. Bytes go to `.tmp-*` in the same folder, are
fsynced, verified, then published with link(2), which never replaces an existing
name: the manifest is linked first and so reserves the sequence number, then the data,
then the folder is fsynced. A crash leaves only `.tmp-*` files (swept at start) or a
manifest without data (swept too); never a partial file under a final name.

Everything here is blocking; the session runs it in a worker thread, except the
writes of an upload received alone, which it makes from the event loop: appends wait
for the disk only when the kernel throttles writers; commit's fsync goes to a thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from common.errors import ConfigError, StorageError
from common.fsutil import fsync_dir
from common.naming import (
    MANIFEST_SUFFIX,
    TEMP_PREFIX,
    backup_name,
    encode_database,
    parse_backup_name,
)

log = logging.getLogger(__name__)
FILE_MODE = 0o440
DIR_MODE = 0o750
MAX_SEQ = 9999


def check_agent_name(name: str) -> None:
    """Refuse an agent name that collector.toml would refuse (and any path trickery).

    An agent name becomes a folder under the root, so a name given on the command line or
    read from a file in the store must pass this before it is joined to a path.

    Raises:
        ConfigError: naming the option.
    """
    if not name or name[0] in ".-" or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"--agent {name!r} is not a valid agent name")


def _storage_error(action: str, path: Path, exc: OSError) -> StorageError:
    reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
    return StorageError(f"cannot {action} {path}: {reason}")


@dataclass(frozen=True)
class StoredBackup:
    """A published backup: where it is and what its manifest says."""

    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


WRITE_BEHIND = 8 * 1024 * 1024  # bytes written between writeback hints


class Upload:
    """One backup being received into a temporary file."""

    def __init__(self, folder: Path, database: str, ext: str) -> None:
        self.folder = folder
        self.database = database
        self.ext = ext
        self.bytes_written = 0
        self._written_back = 0  # writeback started for the bytes before this offset
        self.temp_path = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self._fd: int | None = os.open(
                self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise _storage_error("create", self.temp_path, exc) from None

    def write(self, data: bytes) -> None:
        """Append to the temporary file.

        Raises:
            StorageError: disk full or I/O error.
        """
        if self._fd is None:
            raise StorageError("upload already closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise _storage_error("write", self.temp_path, exc) from None
        self.bytes_written += len(data)
        if self.bytes_written - self._written_back >= WRITE_BEHIND:
            self._write_back()

    def _write_back(self) -> None:
        """Start writing the latest bytes to disk now, without waiting for it.

        Otherwise the whole backup sits dirty in memory until commit's fsync, which then
        waits for all of it (80 ms for 190 MB here, seconds on a slow disk) while the
        agent waits for STORED. POSIX_FADV_DONTNEED starts the writeback of dirty pages
        and drops clean ones: a backup is not read again soon and should not push the
        page cache out. Advisory: an error changes nothing, fsync still decides.
        """
        assert self._fd is not None
        start, self._written_back = self._written_back, self.bytes_written
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, start, self.bytes_written - start,
                             os.POSIX_FADV_DONTNEED)

    def commit(self, day: date, manifest: dict[str, Any]) -> StoredBackup:
        """fsync, then publish under the first free `<db>_<day>[-N]` name.

        If a backup of the same day with the same SHA-256 is already stored, that one
        is returned and nothing new is written (an idempotent retry).

        Raises:
            StorageError: I/O error or no free sequence number.
        """
        self._sync_and_close()
        existing = self._same_content(day, manifest["sha256"])
        if existing is not None:
            self.discard()
            return existing
        for seq in range(1, MAX_SEQ + 1):
            name = backup_name(self.database, day, seq, self.ext)
            final = self.folder / name
            if final.exists():
                continue
            stored = self._publish(final, {**manifest, "name": name})
            if stored is not None:
                return stored
        self.discard()
        raise StorageError(f"no free name left for {self.database} on {day}")

    def commit_as(self, name: str, manifest: dict[str, Any]) -> StoredBackup:
        """fsync, then publish under exactly ``name`` (a recovered backup keeps its name).

        Raises:
            StorageError: I/O error, or ``name`` is already taken (nothing is replaced).
        """
        self._sync_and_close()
        stored = self._publish(self.folder / name, {**manifest, "name": name})
        if stored is None:
            self.discard()
            raise StorageError(f"{self.folder / name} already exists; not replaced")
        return stored

    def _publish(self, final: Path, manifest: dict[str, Any]) -> StoredBackup | None:
        manifest_path = final.with_name(final.name + MANIFEST_SUFFIX)
        manifest_temp = self.folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            _write_file(manifest_temp, json.dumps(manifest, indent=2, sort_keys=True).encode())
            try:
                os.link(manifest_temp, manifest_path)  # reserves the name, never replaces
            except FileExistsError:
                return None
            try:
                os.link(self.temp_path, final)
            except FileExistsError:
                os.unlink(manifest_path)
                return None
            os.unlink(self.temp_path)
            fsync_dir(self.folder)
        except OSError as exc:
            raise _storage_error("publish", final, exc) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(manifest_temp)
        return StoredBackup(final, manifest)

    def _same_content(self, day: date, sha256: str) -> StoredBackup | None:
        for stored in iter_backups(self.folder):
            parsed = parse_backup_name(stored.name)
            if parsed and parsed.day == day and stored.manifest.get("sha256") == sha256:
                return stored
        return None

    def _sync_and_close(self) -> None:
        if self._fd is None:
            raise StorageError("upload already closed")
        fd, self._fd = self._fd, None
        try:
            os.fchmod(fd, FILE_MODE)
            os.fsync(fd)
        except OSError as exc:
            raise _storage_error("sync", self.temp_path, exc) from None
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the temporary file; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)


def _write_file(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(content)
        while view:  # a nearly full disk may accept only part of a write
            view = view[os.write(fd, view) :]
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_backups(folder: Path) -> Iterator[StoredBackup]:
    """Published backups in one database folder (data file and manifest both present)."""
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.endswith(MANIFEST_SUFFIX):
            continue
        data = folder / entry[: -len(MANIFEST_SUFFIX)]
        if parse_backup_name(data.name) is None or not data.exists():
            continue
        try:
            manifest = json.loads((folder / entry).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("unreadable manifest %s", folder / entry)
            continue
        yield StoredBackup(data, manifest)


def _order(backup: StoredBackup) -> tuple[str, int, str]:
    parsed = parse_backup_name(backup.name)
    return (str(backup.manifest.get("started_at", "")), parsed.seq if parsed else 0, backup.name)


class Store:
    """The storage root: one folder per agent, one per database inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_root(self) -> None:
        """Create the root if needed.

        Raises:
            StorageError: it cannot be created.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise _storage_error("create", self.root, exc) from None

    def database_folder(self, agent: str, database: str) -> Path:
        # The agent name comes from configuration; the database name is encoded.
        return self.root / agent / encode_database(database)

    def begin(self, agent: str, database: str, ext: str) -> Upload:
        """Start receiving a backup.

        Raises:
            StorageError: the folder or the temporary file cannot be created.
        """
        folder = self.database_folder(agent, database)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        except OSError as exc:
            raise _storage_error("create", folder, exc) from None
        return Upload(folder, database, ext)

    def backups(self, agent: str, database: str | None = None) -> list[StoredBackup]:
        """Published backups of one agent (optionally one database), oldest first."""
        agent_dir = self.root / agent
        if database is not None:
            folders = [self.database_folder(agent, database)]
        else:
            try:
                folders = sorted(p for p in agent_dir.iterdir() if p.is_dir())
            except FileNotFoundError:
                return []
        found = [b for folder in folders for b in iter_backups(folder)]
        found.sort(key=_order)
        return found

    def sweep(self) -> int:
        """Remove temporaries and orphan manifests left by a crash; returns the count."""
        removed = 0
        if not self.root.exists():
            return 0
        for folder in (p for agent in self.root.iterdir() if agent.is_dir()
                       for p in agent.iterdir() if p.is_dir()):
            for entry in folder.iterdir():
                orphan = entry.name.endswith(MANIFEST_SUFFIX) and not (
                    folder / entry.name[: -len(MANIFEST_SUFFIX)]
                ).exists()
                if entry.name.startswith(TEMP_PREFIX) or orphan:
                    log.warning("removing leftover %s from an interrupted backup", entry)
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                    removed += 1
        return removed
