"""How stored backups are described to people: the facts ``list`` and ``prune`` show for
each backup (size, start time, verified) and the plain text tables and lines they print.

Nothing here reads a backup's contents; the verified column trusts ingest's check, the
data file's size and the last verify run's findings (:mod:`collector.store.verify_status`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo

from collector.store.inventory import GONE, MISMATCH, Check, Entry, entry_key
from collector.store.verify_status import VerifyStatus
from common.text import escape_control, human_bytes

LIST_HEADERS = ("AGENT", "DATABASE", "NAME", "SIZE", "STARTED", "VERIFIED")


def total_size(entries: Iterable[Entry]) -> int:
    """Bytes of the data files of ``entries`` that still exist."""
    total = 0
    for entry in entries:
        with contextlib.suppress(OSError):
            total += entry.path.stat().st_size
    return total


def counts_as_verified(entry: Entry, mismatched: set[tuple[str, str, str, str]]) -> bool:
    """Verified at ingest, the data file still of the manifest's size, and not found
    corrupt by the last verify run that covered it."""
    if entry.manifest is None or entry.manifest.get("verified") is not True:
        return False
    try:
        size = entry.path.stat().st_size
    except OSError:
        return False
    return size == entry.manifest.get("size") and entry_key(entry) not in mismatched


def started_at(entry: Entry) -> datetime | None:
    """The manifest's ``started_at`` as an aware datetime; None if missing or naive."""
    text = entry.manifest.get("started_at") if entry.manifest is not None else None
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None and moment.utcoffset() is not None else None


def listing_rows(
    entries: Sequence[Entry], status: VerifyStatus | None, zone: tzinfo
) -> list[tuple[str, ...]]:
    """One row per backup for ``backhaul-collector list``."""
    mismatched = status.mismatched() if status is not None else set()
    rows: list[tuple[str, ...]] = []
    for entry in entries:
        try:
            size = human_bytes(entry.path.stat().st_size)
        except OSError:
            size = "?"
        moment = started_at(entry)
        when = (
            moment.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
            if moment
            else entry.day.isoformat()
        )
        if entry.manifest is None:
            verified = "no manifest"
        elif entry_key(entry) in mismatched:
            verified = MISMATCH
        else:
            verified = "yes" if counts_as_verified(entry, mismatched) else "no"
        rows.append((entry.agent, entry.database, entry.name, size, when, verified))
    return rows


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()
) -> str:
    """Plain text columns separated by two spaces; ``right`` lists right-aligned columns."""
    body = [[escape_control(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in aligned else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in body)])


def format_check(check: Check) -> str:
    """One line of `verify` output: status, agent/database/name and the reasons."""
    entry = check.entry
    line = f"{check.status:<8}  " + escape_control(f"{entry.agent}/{entry.database}/{entry.name}")
    if check.status == GONE:
        line += ": deleted while verify was running"
    elif check.reasons:
        # Reasons are composed messages that may quote a name already escaped.
        line += ": " + escape_control("; ".join(check.reasons), backslash=False)
    return line
