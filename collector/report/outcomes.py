"""What sessions tell the rest of the collector: one outcome per backup or report.

Sessions know nothing of metrics or notifications; they hand each outcome to an
`OutcomeSink`. The fan-out calls every sink and never lets one sink's failure reach the
backup that produced the outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one backup ended, or one agent REPORT."""

    agent: str
    database: str | None
    backup_id: str
    result: str  # "success" or "failure"
    reason: str | None  # one word for failures (a RejectCode value or an agent reason)
    message: str  # one line, already escaped for logs
    size_bytes: int = 0
    uncompressed_bytes: int | None = None  # the dump's own size, counted while verifying
    duration_s: float = 0.0
    name: str | None = None  # the stored name on success
    is_report: bool = False
    is_drill: bool = False  # a restore drill's result, reported by the agent


class OutcomeSink(Protocol):
    def started(self, agent: str, database: str, backup_id: str) -> None: ...
    def finished(self, outcome: Outcome) -> None: ...
    def agent_seen(self, agent: str) -> None: ...


class FanOut:
    """Calls each sink in turn; a failing sink is logged and skipped."""

    def __init__(self, *sinks: OutcomeSink) -> None:
        self.sinks = list(sinks)

    def started(self, agent: str, database: str, backup_id: str) -> None:
        for sink in self.sinks:
            try:
                sink.started(agent, database, backup_id)
            except Exception:  # a metrics or notification bug must not fail a backup
                log.exception("outcome sink %r failed on start", sink)

    def finished(self, outcome: Outcome) -> None:
        for sink in self.sinks:
            try:
                sink.finished(outcome)
            except Exception:  # see above
                log.exception("outcome sink %r failed on finish", sink)

    def agent_seen(self, agent: str) -> None:
        for sink in self.sinks:
            try:
                sink.agent_seen(agent)
            except Exception:  # see above
                log.exception("outcome sink %r failed on agent_seen", sink)
