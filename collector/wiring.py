"""Builds the outcome sinks (metrics, notifications) a collector's configuration asks for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from collector.config import CollectorConfig
from collector.outcomes import OutcomeSink

Closer = Callable[[], Awaitable[None]]


async def build_sinks(config: CollectorConfig) -> tuple[list[OutcomeSink], list[Closer]]:
    """The sinks to feed and the coroutines that stop them at shutdown."""
    return [], []
