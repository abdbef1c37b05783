"""settle(): ending a background task whatever state it is in."""

from __future__ import annotations

import asyncio

from agent.link.pending import settle
from common.errors import TransportError


async def test_a_task_that_succeeded_gives_its_result() -> None:
    async def opened() -> str:
        return "channel"

    task = asyncio.create_task(opened())
    await asyncio.sleep(0)
    assert await settle(task) == "channel"


async def test_a_task_still_running_is_cancelled_and_gives_nothing() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    assert await settle(task) is None
    assert task.cancelled()


async def test_a_failed_task_gives_nothing_and_its_error_counts_as_retrieved() -> None:
    async def refused() -> str:
        raise TransportError("collector refused the backhaul channel")

    task = asyncio.create_task(refused())
    await asyncio.wait({task})
    assert await settle(task) is None
    # Retrieved: asyncio would otherwise log "Task exception was never retrieved".
    assert task._log_traceback is False  # type: ignore[attr-defined]
