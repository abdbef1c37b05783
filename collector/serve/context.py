"""What a request handler (upload, report, lookup) gets: the context all sessions share,
and the channel it serves, as the few calls it may make on the session.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, Protocol

from collector.report.outcomes import FanOut
from collector.store.files import Store
from common.errors import RejectCode
from common.events import Event
from common.integrity import DEFAULT_MAX_RATIO


@dataclass
class SessionContext:
    """What every session of the collector shares."""

    store: Store
    timezone: tzinfo
    outcomes: FanOut
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0  # channel open -> HELLO -> request, in all
    min_upload_rate: int = 1024  # bytes/s each window of an upload must average; 0: off
    min_upload_rate_window: float = 60.0
    clock_skew: float = 600.0
    max_backup_bytes: int | None = None
    max_expansion: int = DEFAULT_MAX_RATIO
    allowed: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    agent_max_bytes: dict[str, int | None] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    clock: Any = time.time
    uploads: int = 0  # BEGIN…END in progress, over all sessions


class RequestChannel(Protocol):
    """One request's channel, as a handler sees it (the session implements it)."""

    agent: str  # authenticated by the server; nothing in the stream can change it
    peer: str

    @property
    def ctx(self) -> SessionContext: ...

    @property
    def peer_max_data(self) -> int: ...

    async def next_event(self) -> Event: ...

    def queued_event(self) -> Event | None: ...

    def start_rate_floor(self) -> None: ...

    async def send(self, event: Event) -> None: ...

    async def reject(self, code: RejectCode, reason: str) -> None: ...

    def database_allowed(self, database: str) -> bool: ...
