"""Which backup outcomes become notifications: first failure, rate-limited repeats, recovery.

Pure: no I/O, a clock passed in, so every rule is tested without sockets or sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from collector.report.notify.message import Event, Notification


@dataclass
class _PairState:
    last_sent: float
    suppressed: int = 0


class NotifyPolicy:
    """Decides, without I/O, which events become notifications.

    A first failure is sent; further failures of the same (agent, database) within
    ``min_interval`` seconds of the last message are counted, and the count rides on
    the next message. A success after failures is a recovery and is always sent; a
    success with no failure before it sends nothing.
    """

    def __init__(self, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._min_interval = min_interval
        self._clock = clock
        self._failing: dict[tuple[str, str], _PairState] = {}

    def decide(self, event: Event) -> Notification | None:
        key = (event.agent, event.database)
        state = self._failing.get(key)
        if event.kind == "recovery":
            if state is None:
                return None
            del self._failing[key]
            return Notification(event, state.suppressed)
        now = self._clock()
        if state is None:
            self._failing[key] = _PairState(last_sent=now)
            return Notification(event)
        if now - state.last_sent < self._min_interval:
            state.suppressed += 1
            return None
        sent = Notification(event, state.suppressed)
        state.last_sent, state.suppressed = now, 0
        return sent
