"""Progress of a backup, restore or drill: a one-line bar on a terminal, log lines elsewhere.

On a terminal the bar is redrawn in place with a carriage return (bytes, rate, ETA from
the size estimate), at most a few times a second. Anywhere else (a pipe, cron, journald)
the same facts go to the log every ``log_interval`` seconds, so a log file never fills
with carriage returns.

    display = ProgressDisplay.for_stream(sys.stderr)
    runner = BackupRunner(config, client, progress_factory=display.meter)
    ...
    display.finish()        # ends the last bar's line before results are printed
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

from agent.stream.stages import Progress
from common.text import escape_control, human_bytes

log = logging.getLogger(__name__)
REDRAW_INTERVAL = 0.2
LOG_INTERVAL = 30.0
BAR_WIDTH = 24


def human_duration(seconds: float) -> str:
    """``83`` → ``1:23``; ``3725`` → ``1:02:05``."""
    total = max(0, int(seconds + 0.5))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Meter(Progress):
    """Counts bytes of one transfer against an optional total and redraws as it goes.

    A :class:`~agent.stream.stages.Progress`, so the backup pipeline updates it directly:
    ``raw_bytes`` (the dump's bytes) is what is measured against the size estimate.
    """

    def __init__(self, display: ProgressDisplay, label: str, total: int | None) -> None:
        self.done = 0
        self._display = display
        self.label = escape_control(label)
        self.total = total if total and total > 0 else None
        self.started = display.clock()
        super().__init__()

    @property  # a counter the pipeline sets, observed here
    def raw_bytes(self) -> int:
        return self.done

    @raw_bytes.setter
    def raw_bytes(self, value: int) -> None:
        self.done = value
        self._display.update(self)

    def advance(self, count: int) -> None:
        """Add ``count`` bytes (restores and drills count fetched bytes this way)."""
        self.raw_bytes = self.done + count

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if self.total is None or rate <= 0 or self.done >= self.total:
            return None
        return (self.total - self.done) / rate

    def describe(self, now: float) -> str:
        """The facts as one plain sentence, for the log."""
        parts = [f"{self.label}: {human_bytes(self.done)}"]
        if self.total is not None:
            percent = min(99, int(100 * self.done / self.total))
            parts[0] += f" of about {human_bytes(self.total)} ({percent}%)"
        parts.append(f"{human_bytes(self.rate(now))}/s")
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        return ", ".join(parts)

    def bar(self, now: float, width: int) -> str:
        """The terminal line, at most ``width`` characters."""
        rate = f"{human_bytes(self.rate(now))}/s"
        eta = self.eta(now)
        tail = f"  {human_bytes(self.done)}  {rate}"
        if self.total is not None:
            fraction = min(1.0, self.done / self.total)
            filled = int(BAR_WIDTH * fraction)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            tail = f" [{bar}] {min(99, int(100 * fraction)):3d}%{tail}"
            tail += f"  ETA {human_duration(eta)}" if eta is not None else "  ETA --:--"
        room = max(8, width - len(tail) - 1)
        label = self.label if len(self.label) <= room else self.label[: room - 1] + "~"
        return (label + tail)[: max(0, width - 1)]


class ProgressDisplay:
    """Where meters show themselves: a terminal bar or periodic log lines."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interactive: bool,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = LOG_INTERVAL,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self.stream = stream
        self.interactive = interactive
        self.clock = clock
        self.log_interval = log_interval
        self._columns = columns or (lambda: shutil.get_terminal_size((80, 24)).columns)
        self._current: Meter | None = None
        self._last_draw = float("-inf")
        self._drawn = False

    @classmethod
    def for_stream(cls, stream: TextIO | None = None) -> ProgressDisplay:
        """A bar when ``stream`` (default stderr) is a terminal, log lines otherwise."""
        stream = stream or sys.stderr
        try:
            interactive = stream.isatty()
        except (AttributeError, ValueError):
            interactive = False
        return cls(stream, interactive=interactive)

    def meter(self, label: str, total: int | None) -> Meter:
        """A new meter; the previous one's line is ended first. Fits ``progress_factory``."""
        self.finish()
        self._current = Meter(self, label, total)
        self._last_draw = self.clock() if not self.interactive else float("-inf")
        return self._current

    def update(self, meter: Meter) -> None:
        now = self.clock()
        interval = REDRAW_INTERVAL if self.interactive else self.log_interval
        if meter is not self._current or now - self._last_draw < interval:
            return
        self._last_draw = now
        if self.interactive:
            self.stream.write("\r" + meter.bar(now, self._columns()) + "\x1b[K")
            self.stream.flush()
            self._drawn = True
        else:
            log.info("%s", meter.describe(now))

    def finish(self) -> None:
        """Draw the current meter's final state and end its line."""
        meter, self._current = self._current, None
        if meter is None or not self.interactive:
            return
        if self._drawn or meter.done:
            self.stream.write("\r" + meter.bar(self.clock(), self._columns()) + "\x1b[K\n")
            self.stream.flush()
        self._drawn = False
