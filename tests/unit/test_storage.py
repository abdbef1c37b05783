"""Tests for the backup files on the collector: temporary upload, no-replace publish
with sequence numbers, idempotent retries, sweeping leftovers, listing, and error
translation."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from collector.store.files import FILE_MODE, WRITE_BEHIND, Store, StoredBackup, Upload, iter_backups
from common.errors import StorageError
from common.naming import MANIFEST_SUFFIX, TEMP_PREFIX, encode_database

AGENT = "web1"
DAY = date(2026, 11, 26)
EXT = "sql.zst"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "backups")
    store.ensure_root()
    return store


def manifest_for(content: bytes, started_at: str = "2026-11-26T01:30:00+00:00") -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(content).hexdigest(),
        "size": len(content),
        "started_at": started_at,
    }


def upload(
    store: Store,
    content: bytes,
    *,
    database: str = "hospital",
    day: date = DAY,
    started_at: str = "2026-11-26T01:30:00+00:00",
) -> StoredBackup:
    pending = store.begin(AGENT, database, EXT)
    pending.write(content)
    return pending.commit(day, manifest_for(content, started_at))


def folder_of(store: Store, database: str = "hospital") -> Path:
    return store.root / AGENT / encode_database(database)


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fake_write(root: Path, behaviour: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    """An os.write that applies ``behaviour`` to files under ``root`` only."""
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(root)):
            return behaviour(fd, data)
        return real_write(fd, data)

    return write


def failing_write(code: int) -> Callable[[int, Any], int]:
    def behaviour(fd: int, data: Any) -> int:
        raise OSError(code, os.strerror(code))

    return behaviour


# --- publishing --------------------------------------------------------------------------


def test_commit_publishes_data_and_manifest_read_only(store: Store) -> None:
    stored = upload(store, b"dump bytes")
    folder = folder_of(store)
    data = folder / "hospital_20261126.sql.zst"
    manifest = folder / ("hospital_20261126.sql.zst" + MANIFEST_SUFFIX)
    assert stored.path == data
    assert stored.name == "hospital_20261126.sql.zst"
    assert data.read_bytes() == b"dump bytes"
    assert mode(data) == FILE_MODE == 0o440
    assert mode(manifest) == 0o440
    assert json.loads(manifest.read_text()) == stored.manifest
    assert stored.manifest["name"] == stored.name
    assert stored.manifest["sha256"] == hashlib.sha256(b"dump bytes").hexdigest()
    assert temps(folder) == []


def test_upload_counts_bytes_written_across_writes(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    for piece in (b"abc", b"", b"defg"):
        pending.write(piece)
    assert pending.bytes_written == 7
    assert pending.commit(DAY, manifest_for(b"abcdefg")).path.read_bytes() == b"abcdefg"


def test_temporary_file_lives_in_the_database_folder_until_commit(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"partial")
    assert pending.temp_path.parent == folder_of(store)
    assert pending.temp_path.name.startswith(TEMP_PREFIX)
    assert pending.temp_path.read_bytes() == b"partial"
    assert list(iter_backups(folder_of(store))) == []
    pending.discard()


def test_later_commits_the_same_day_get_sequence_numbers(store: Store) -> None:
    first = upload(store, b"one")
    second = upload(store, b"two")
    third = upload(store, b"three")
    assert [first.name, second.name, third.name] == [
        "hospital_20261126.sql.zst",
        "hospital_20261126-2.sql.zst",
        "hospital_20261126-3.sql.zst",
    ]
    assert first.path.read_bytes() == b"one"
    assert second.path.read_bytes() == b"two"
    assert third.path.read_bytes() == b"three"
    assert temps(folder_of(store)) == []


def test_commit_never_replaces_a_file_under_the_next_name(store: Store) -> None:
    """A stray data file without a manifest is skipped over, not overwritten."""
    folder = folder_of(store)
    folder.mkdir(parents=True)
    stray = folder / "hospital_20261126.sql.zst"
    stray.write_bytes(b"stray")
    stored = upload(store, b"new")
    assert stored.name == "hospital_20261126-2.sql.zst"
    assert stray.read_bytes() == b"stray"


def test_commit_never_replaces_a_leftover_manifest(store: Store) -> None:
    folder = folder_of(store)
    folder.mkdir(parents=True)
    leftover = folder / ("hospital_20261126.sql.zst" + MANIFEST_SUFFIX)
    leftover.write_text('{"leftover": true}')
    stored = upload(store, b"new")
    assert stored.name == "hospital_20261126-2.sql.zst"
    assert json.loads(leftover.read_text()) == {"leftover": True}


def test_a_new_day_starts_again_without_a_suffix(store: Store) -> None:
    upload(store, b"one")
    upload(store, b"two")
    stored = upload(store, b"three", day=date(2026, 11, 27))
    assert stored.name == "hospital_20261127.sql.zst"


# --- idempotent retries ------------------------------------------------------------------


def test_same_content_the_same_day_returns_the_existing_backup(store: Store) -> None:
    first = upload(store, b"same bytes")
    again = upload(store, b"same bytes")
    folder = folder_of(store)
    assert again.path == first.path
    assert again.manifest == first.manifest
    assert sorted(p.name for p in folder.iterdir()) == [
        "hospital_20261126.sql.zst",
        "hospital_20261126.sql.zst" + MANIFEST_SUFFIX,
    ]


def test_retry_matches_a_later_sequence_number_too(store: Store) -> None:
    upload(store, b"one")
    second = upload(store, b"two")
    assert upload(store, b"two").path == second.path
    assert len(list(iter_backups(folder_of(store)))) == 2


def test_same_content_on_another_day_is_a_new_backup(store: Store) -> None:
    first = upload(store, b"same bytes")
    later = upload(store, b"same bytes", day=date(2026, 11, 27))
    assert later.path != first.path
    assert later.name == "hospital_20261127.sql.zst"


# --- discarding and closing --------------------------------------------------------------


def test_discard_leaves_no_temporary_file(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"half a dump")
    pending.discard()
    pending.discard()
    assert temps(folder_of(store)) == []
    assert list(iter_backups(folder_of(store))) == []


def test_discard_after_commit_keeps_the_backup(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"data")
    stored = pending.commit(DAY, manifest_for(b"data"))
    pending.discard()
    assert stored.path.read_bytes() == b"data"


def test_write_after_discard_is_a_storage_error(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.discard()
    with pytest.raises(StorageError, match="closed"):
        pending.write(b"late")


def test_commit_twice_is_a_storage_error(store: Store) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"data")
    pending.commit(DAY, manifest_for(b"data"))
    with pytest.raises(StorageError, match="closed"):
        pending.commit(DAY, manifest_for(b"data"))


# --- sweeping ----------------------------------------------------------------------------


def test_sweep_removes_temporaries_and_orphan_manifests_only(store: Store) -> None:
    kept = upload(store, b"kept")
    folder = folder_of(store)
    abandoned = store.begin(AGENT, "hospital", EXT)
    abandoned.write(b"interrupted")
    (folder / f"{TEMP_PREFIX}0123456789abcdef").write_bytes(b"old temp")
    orphan = folder / ("hospital_20261126-5.sql.zst" + MANIFEST_SUFFIX)
    orphan.write_text("{}")
    other_folder = folder_of(store, "billing")
    other_folder.mkdir()
    (other_folder / f"{TEMP_PREFIX}feedfacefeedface").write_bytes(b"")

    assert store.sweep() == 4
    assert sorted(p.name for p in folder.iterdir()) == [
        kept.name,
        kept.name + MANIFEST_SUFFIX,
    ]
    assert list(other_folder.iterdir()) == []
    assert kept.path.read_bytes() == b"kept"
    assert store.sweep() == 0


def test_sweep_keeps_data_files_without_manifests(store: Store) -> None:
    folder = folder_of(store)
    folder.mkdir(parents=True)
    (folder / "hospital_20261126.sql.zst").write_bytes(b"data")
    assert store.sweep() == 0
    assert (folder / "hospital_20261126.sql.zst").exists()


def test_sweep_of_a_missing_root_does_nothing(tmp_path: Path) -> None:
    assert Store(tmp_path / "absent").sweep() == 0


# --- listing -----------------------------------------------------------------------------


def test_backups_lists_oldest_first_across_databases(store: Store) -> None:
    upload(
        store,
        b"c",
        database="billing",
        day=date(2026, 11, 27),
        started_at="2026-11-27T01:30:00+00:00",
    )
    upload(
        store,
        b"a",
        database="hospital",
        day=date(2026, 11, 25),
        started_at="2026-11-25T01:30:00+00:00",
    )
    upload(
        store,
        b"b",
        database="billing",
        day=date(2026, 11, 26),
        started_at="2026-11-26T01:30:00+00:00",
    )
    upload(
        store,
        b"d",
        database="hospital",
        day=date(2026, 11, 27),
        started_at="2026-11-27T02:00:00+00:00",
    )
    listed = store.backups(AGENT)
    assert [(b.manifest["started_at"][:16], b.path.read_bytes()) for b in listed] == [
        ("2026-11-25T01:30", b"a"),
        ("2026-11-26T01:30", b"b"),
        ("2026-11-27T01:30", b"c"),
        ("2026-11-27T02:00", b"d"),
    ]


def test_backups_of_one_database(store: Store) -> None:
    upload(store, b"a", database="hospital")
    upload(store, b"b", database="billing")
    assert [b.path.read_bytes() for b in store.backups(AGENT, "billing")] == [b"b"]
    assert store.backups(AGENT, "absent") == []


def test_backups_of_an_unknown_agent_is_empty(store: Store) -> None:
    assert store.backups("nobody") == []


def test_backups_leave_out_unpublished_and_unreadable_entries(store: Store) -> None:
    good = upload(store, b"good")
    folder = folder_of(store)
    (folder / ("hospital_20261126-7.sql.zst" + MANIFEST_SUFFIX)).write_text("{}")
    (folder / "hospital_20261126-8.sql.zst").write_bytes(b"no manifest")
    (folder / "hospital_20261126-9.sql.zst").write_bytes(b"bad manifest")
    (folder / ("hospital_20261126-9.sql.zst" + MANIFEST_SUFFIX)).write_text("{not json")
    (folder / ("notes.txt" + MANIFEST_SUFFIX)).write_text("{}")
    (folder / "notes.txt").write_text("x")
    assert [b.name for b in store.backups(AGENT)] == [good.name]


# --- hostile names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "database", ["..", "../..", "a/../../b", ".hidden", "-rf", "/etc/passwd", "sp ace", "\u00fc"]
)
def test_hostile_database_name_stays_inside_its_agent_folder(store: Store, database: str) -> None:
    stored = upload(store, b"x", database=database)
    agent_dir = (store.root / AGENT).resolve()
    assert stored.path.resolve().parent.parent == agent_dir
    assert stored.path.parent.name == encode_database(database)
    assert not stored.path.name.startswith((".", "-"))
    assert [b.manifest["sha256"] for b in store.backups(AGENT, database)] == [
        hashlib.sha256(b"x").hexdigest()
    ]


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_while_writing_is_a_storage_error(
    store: Store, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    monkeypatch.setattr(os, "write", fake_write(store.root, failing_write(code)))
    with pytest.raises(StorageError, match="disk full") as caught:
        pending.write(b"data")
    assert str(pending.temp_path) in str(caught.value)
    monkeypatch.undo()
    pending.discard()
    assert temps(folder_of(store)) == []


def test_other_write_errors_keep_their_reason(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    monkeypatch.setattr(os, "write", fake_write(store.root, failing_write(errno.EIO)))
    with pytest.raises(StorageError, match=os.strerror(errno.EIO)):
        pending.write(b"data")
    monkeypatch.undo()
    pending.discard()


def test_full_disk_while_publishing_is_a_storage_error(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"data")
    monkeypatch.setattr(os, "write", fake_write(store.root, failing_write(errno.ENOSPC)))
    with pytest.raises(StorageError, match="disk full"):
        pending.commit(DAY, manifest_for(b"data"))
    monkeypatch.undo()
    pending.discard()
    assert list(folder_of(store).iterdir()) == []


def test_short_writes_of_data_are_completed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[: max(1, len(data) // 3)]))

    pending = store.begin(AGENT, "hospital", EXT)
    monkeypatch.setattr(os, "write", fake_write(store.root, short))
    pending.write(b"0123456789" * 10)
    monkeypatch.undo()
    stored = pending.commit(DAY, manifest_for(b"0123456789" * 10))
    assert stored.path.read_bytes() == b"0123456789" * 10


def test_short_writes_of_the_manifest_are_completed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nearly full disk can accept part of a write; the manifest must still be whole."""
    real_write = os.write

    def short(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[: max(1, len(data) // 2)]))

    pending = store.begin(AGENT, "hospital", EXT)
    pending.write(b"data")
    monkeypatch.setattr(os, "write", fake_write(store.root, short))
    stored = pending.commit(DAY, manifest_for(b"data"))
    monkeypatch.undo()
    manifest_path = stored.path.with_name(stored.name + MANIFEST_SUFFIX)
    assert json.loads(manifest_path.read_text()) == stored.manifest
    assert stored.manifest["sha256"] == manifest_for(b"data")["sha256"]
    assert stored.path.read_bytes() == b"data"
    assert temps(folder_of(store)) == []


def test_folder_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "root"
    blocker.write_text("a file where the storage root should be")
    with pytest.raises(StorageError, match="cannot create"):
        Store(blocker).begin(AGENT, "hospital", EXT)
    with pytest.raises(StorageError, match="cannot create"):
        Store(blocker / "below").ensure_root()


def test_temporary_file_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot create"):
        Upload(tmp_path / "missing", "hospital", EXT)


def test_large_uploads_start_writeback_as_they_go_and_still_store_every_byte(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    hints: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        hints.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    piece = os.urandom(1024 * 1024)
    upload = store.begin(AGENT, "hospital", EXT)
    for _ in range(3 * WRITE_BEHIND // len(piece) + 2):
        upload.write(piece)
    content = piece * (3 * WRITE_BEHIND // len(piece) + 2)
    stored = upload.commit(DAY, manifest_for(content))
    # One hint per WRITE_BEHIND bytes, back to back from the start; the tail is
    # left to commit's fsync.
    assert [(o, n) for o, n, _ in hints] == [(i * WRITE_BEHIND, WRITE_BEHIND) for i in range(3)]
    assert {a for _, _, a in hints} == {os.POSIX_FADV_DONTNEED}
    assert stored.path.read_bytes() == content


def test_small_uploads_give_no_writeback_hint(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    hints: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: hints.append(1))
    upload = store.begin(AGENT, "hospital", EXT)
    upload.write(b"x" * (WRITE_BEHIND - 1))
    upload.commit(DAY, manifest_for(b"x" * (WRITE_BEHIND - 1)))
    assert hints == []
