"""What a notification says: one backup outcome, as webhook JSON and as an e-mail.

Names, reasons and messages can come from an agent; the e-mail subject and body show
them through :func:`common.text.escape_control`, so a hostile name cannot add a header
or a line. The webhook body carries them exactly (JSON escapes them itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from common.text import escape_control

EventKind = Literal["failure", "recovery"]


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


@dataclass(frozen=True)
class Event:
    """One backup outcome for (agent, database).

    ``kind="failure"`` reports a failed backup; ``kind="recovery"`` reports a successful
    one and is delivered only when it ends a run of failures. ``time`` is normalised to
    UTC (a naive value is taken as UTC).
    """

    kind: EventKind
    agent: str
    database: str
    reason: str
    message: str
    backup: str | None
    time: datetime
    collector: str

    def __post_init__(self) -> None:
        utc = (
            self.time.replace(tzinfo=UTC) if self.time.tzinfo is None else self.time.astimezone(UTC)
        )
        object.__setattr__(self, "time", utc)


@dataclass(frozen=True)
class Notification:
    """What is delivered: an event plus how many like it were suppressed before it."""

    event: Event
    suppressed: int = 0

    def to_json(self) -> dict[str, object]:
        """The webhook body; values are exact (JSON escapes them), not display-escaped."""
        e = self.event
        return {
            "kind": e.kind,
            "agent": e.agent,
            "database": e.database,
            "reason": e.reason,
            "message": e.message,
            "backup": e.backup,
            "time": e.time.isoformat().replace("+00:00", "Z"),
            "collector": e.collector,
            "suppressed": self.suppressed,
        }

    def subject(self) -> str:
        e = self.event
        where = f"{_clip(escape_control(e.database), 80)} on {_clip(escape_control(e.agent), 80)}"
        if e.kind == "recovery":
            return f"[backhaul] RECOVERED {where}"
        more = f" (+{self.suppressed} suppressed)" if self.suppressed else ""
        return f"[backhaul] FAILED {where}: {_clip(escape_control(e.reason), 40)}{more}"

    def body(self) -> str:
        e = self.event
        if e.kind == "recovery":
            title = "Backhaul: backup RECOVERED (succeeded after earlier failures)"
        else:
            title = "Backhaul: backup FAILED"
        note = f"{self.suppressed} (failures not notified since the previous message)"
        rows = (
            ("Agent", e.agent),
            ("Database", e.database),
            ("Reason", e.reason),
            ("Message", e.message),
            ("Backup", e.backup if e.backup is not None else "-"),
            ("Time (UTC)", e.time.strftime("%Y-%m-%d %H:%M:%S")),
            ("Collector", e.collector),
        )
        lines = [title, ""]
        lines += [
            f"{label + ':':<12} {_clip(escape_control(value), 2000)}" for label, value in rows
        ]
        lines += [f"{'Suppressed:':<12} {note}", ""]
        return "\n".join(lines)
