"""The collector connection of a one-shot run, made while the first dump starts.

``backhaul-agent backup`` used to import the SSH stack (asyncssh and cryptography, a
fifth of a second here), connect, and only then ask the database anything. A
:class:`PendingClient` imports in a worker thread and connects in the background while
the runner checks the database and starts its dump; agent.stream.early_buffer holds what the
dump makes until the channel is open.

A connection that cannot be made still fails the whole run, as before: the runner
gets it as :class:`LinkDown`, which no per-database handler catches.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, TypeVar, cast

from common.errors import BackhaulError

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.link.connection import CollectorClient

T = TypeVar("T")


async def settle(task: asyncio.Task[T]) -> T | None:
    """Cancel ``task`` if it is still running and wait for it to end.

    Returns its result if it succeeded, else None; its error, if any, is retrieved
    (the caller has had its say on it), so asyncio does not log it at exit.
    """
    if not task.done():
        task.cancel()
    await asyncio.wait({task})
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


class LinkDown(Exception):
    """The run's connection to the collector could not be made: the run ends."""

    def __init__(self, error: BackhaulError) -> None:
        super().__init__(str(error))
        self.error = error


class PendingClient:
    """A collector client that is still connecting. Create it inside the event loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._client: CollectorClient | None = None
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> CollectorClient:
        # In a thread: the import would otherwise hold the event loop, and with it the
        # dump's output, for as long as it takes.
        module = await asyncio.to_thread(importlib.import_module, "agent.link.abort_on_close")
        client = cast("CollectorClient", module.AbortOnCloseClient(self.config))
        self._client = client
        await client.connect()
        return client

    @property
    def failed(self) -> bool:
        """True once connecting has failed."""
        return (self._task.done() and not self._task.cancelled()
                and self._task.exception() is not None)

    async def get(self) -> CollectorClient:
        """The connected client, waiting for it if need be.

        Raises:
            LinkDown: the connection could not be made (the error is ``.error``).
        """
        try:
            return await asyncio.shield(self._task)
        except BackhaulError as exc:
            raise LinkDown(exc) from None

    async def close(self) -> None:
        """Stop connecting, or close the connection (flushing pending ABORTs)."""
        await settle(self._task)  # a failure was the runner's to report
        if self._client is not None:
            await self._client.close()
