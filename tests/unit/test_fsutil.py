"""The shared file lock and folder fsync (common.fsutil)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.errors import StorageError
from common.fsutil import file_lock, fsync_dir


def test_a_held_lock_refuses_a_second_holder_that_does_not_wait(tmp_path: Path) -> None:
    busy = "another prune is running"
    with (
        file_lock(tmp_path, ".x.lock"),
        pytest.raises(StorageError, match=busy),
        file_lock(tmp_path, ".x.lock", wait=False, busy=busy),
    ):
        pass


def test_a_released_lock_can_be_taken_again(tmp_path: Path) -> None:
    with file_lock(tmp_path, ".x.lock"):
        pass
    with file_lock(tmp_path, ".x.lock", wait=False):
        pass


def test_the_lock_file_is_not_world_readable(tmp_path: Path) -> None:
    with file_lock(tmp_path, ".x.lock"):
        pass
    assert stat.S_IMODE(os.stat(tmp_path / ".x.lock").st_mode) & 0o007 == 0


def test_a_lock_in_a_missing_folder_names_the_path(tmp_path: Path) -> None:
    with (
        pytest.raises(StorageError, match="cannot open the lock"),
        file_lock(tmp_path / "absent", ".x.lock"),
    ):
        pass


def test_fsync_dir_syncs_a_folder_and_refuses_a_missing_one(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "absent")
