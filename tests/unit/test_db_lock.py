"""The per-database lock, between real processes: the second comer is told who holds it
and fails or waits; a lock of a killed process never blocks."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.db_lock import DatabaseBusyError, DatabaseLock, hold_database
from common.errors import ConfigError

HOLDER = """
import sys, time
from pathlib import Path
from agent.db_lock import DatabaseLock
lock = DatabaseLock(Path(sys.argv[1]), "main", "hospital", "backhaul-agent run")
assert lock.try_acquire() is None
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


async def start_holder(run_dir: Path, seconds: float) -> asyncio.subprocess.Process:
    """Another process that takes the lock of main/hospital and keeps it ``seconds``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(run_dir), str(seconds),
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
    return proc


async def test_second_comer_is_told_who_holds_the_lock(tmp_path: Path) -> None:
    holder = await start_holder(tmp_path, 30)
    try:
        with pytest.raises(DatabaseBusyError) as caught:
            async with hold_database(tmp_path, "main", "hospital", "backhaul-agent backup",
                                     wait=False):  # fmt: skip
                pytest.fail("the lock was taken twice")
        message = str(caught.value)
        assert f"pid {holder.pid} (backhaul-agent run) since " in message
        assert "main/hospital is busy" in message and "--wait" in message
    finally:
        holder.kill()
        await holder.wait()


async def test_waiting_takes_the_lock_once_the_holder_is_done(tmp_path: Path) -> None:
    holder = await start_holder(tmp_path, 1.5)
    started = time.monotonic()
    async with hold_database(tmp_path, "main", "hospital", "backhaul-agent backup", wait=True):
        waited = time.monotonic() - started
    assert await holder.wait() == 0
    assert 1.0 < waited < 10


async def test_a_killed_holder_never_blocks(tmp_path: Path) -> None:
    holder = await start_holder(tmp_path, 300)
    holder.send_signal(signal.SIGKILL)
    await holder.wait()
    lock = DatabaseLock(tmp_path, "main", "hospital", "backhaul-agent backup")
    assert lock.try_acquire() is None
    lock.release()


async def test_other_databases_are_not_blocked(tmp_path: Path) -> None:
    holder = await start_holder(tmp_path, 30)
    try:
        async with hold_database(tmp_path, "main", "other", "backhaul-agent backup", wait=False):
            pass
        async with hold_database(tmp_path, "replica", "hospital", "x", wait=False):
            pass
    finally:
        holder.kill()
        await holder.wait()


async def test_a_lock_that_cannot_be_opened_is_a_configuration_error(tmp_path: Path) -> None:
    """Fail closed, naming what to change: no lock, no backup."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"cannot open the lock of main/hospital .*run_dir"):
        async with hold_database(blocker / "run", "main", "hospital", "x", wait=False):
            pytest.fail("ran without the lock")
