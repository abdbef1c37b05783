"""Backup schedules: `daily HH:MM`, `every N<unit>` and 5-field cron, and their next run.

Pure: no clock and no I/O. A schedule is read from the wall clock of whatever zone the
caller's datetime carries (the service passes the host's local zone), and
:meth:`Schedule.next_after` answers with the first run strictly after a given instant.

    daily 02:30        every day at 02:30
    every 6h           at midnight and every 6 hours after it: 00:00, 06:00, 12:00, 18:00
    every 30m          units s, m, h, d; the count restarts at each midnight, like cron's
                       */N, so an interval that does not divide a day has a short last gap
    15 2 * * *         cron: minute hour day-of-month month day-of-week, with *, lists,
                       ranges, steps (*/15, 1-5, 8-18/2) and names (mon-fri, jan)
    @daily             cron shorthands: @hourly, @daily (@midnight), @weekly, @monthly

Cron follows Vixie cron: day 0 and 7 are Sunday, and when both day-of-month and
day-of-week are restricted a day matching either runs.

Daylight-saving changes follow the wall clock: a time that does not exist that day
(02:30 when clocks jump from 02:00 to 03:00) runs once, an hour later by the wall clock;
a time that happens twice (when clocks go back) runs once, the first time.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Protocol

SECONDS_PER_DAY = 86_400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": SECONDS_PER_DAY}
_EVERY_RE = re.compile(r"\Aevery\s+([1-9][0-9]{0,5})\s*([smhd])\Z")
_DURATION_RE = re.compile(r"\A([1-9][0-9]{0,5})\s*([smhd])\Z")
_DAILY_RE = re.compile(r"\Adaily\s+([0-9]{1,2}):([0-9]{2})\Z")
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
}
_MONTH_NAMES = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAY_NAMES = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_SEARCH_DAYS = 366 * 8  # far enough to reach any 29 February


class Schedule(Protocol):
    """When a source's backups run."""

    @property
    def text(self) -> str:
        """The schedule as written."""
        ...

    def next_after(self, after: datetime) -> datetime:
        """The first run strictly after ``after`` (an aware datetime), in its zone."""
        ...


def parse_schedule(text: str) -> Schedule:
    """Read a schedule as written in agent.toml.

    Raises:
        ValueError: with a one-line reason fit for a configuration error.
    """
    cleaned = " ".join(text.split())
    lowered = cleaned.lower()
    if lowered.startswith("every"):
        return _parse_every(cleaned, lowered)
    if lowered.startswith("daily"):
        match = _DAILY_RE.match(lowered)
        if match is None:
            raise ValueError(f'{text!r}: write a daily schedule as "daily HH:MM"')
        hour, minute = int(match[1]), int(match[2])
        if hour > 23 or minute > 59:
            raise ValueError(f"{text!r}: {hour:02d}:{minute:02d} is not a time of day")
        return CronSchedule.parse(f"{minute} {hour} * * *", text=cleaned)
    if lowered.startswith("@"):
        if lowered not in _MACROS:
            raise ValueError(f"{text!r}: unknown shorthand; use one of {', '.join(_MACROS)}")
        return CronSchedule.parse(_MACROS[lowered], text=cleaned)
    return CronSchedule.parse(cleaned)


def parse_duration(text: str) -> int:
    """Seconds in a duration written as `every` takes it: a count and a unit s, m, h or d
    ("10m", "2s", "1 h").

    Raises:
        ValueError: with a one-line reason fit for a configuration error.
    """
    match = _DURATION_RE.match(" ".join(text.split()).lower())
    if match is None:
        raise ValueError(f'{text!r}: write a duration as a count and a unit s, m, h or d, e.g. 10m')
    return int(match[1]) * _UNITS[match[2]]


def _parse_every(text: str, lowered: str) -> EverySchedule:
    match = _EVERY_RE.match(lowered)
    if match is None:
        raise ValueError(
            f'{text!r}: write an interval as "every N" and a unit s, m, h or d, e.g. every 6h'
        )
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds > SECONDS_PER_DAY:
        raise ValueError(f"{text!r}: an interval longer than a day needs a cron expression")
    return EverySchedule(text, seconds)


@dataclass(frozen=True)
class EverySchedule:
    """Local midnight and every ``seconds`` after it, restarting at the next midnight."""

    text: str
    seconds: int

    def next_after(self, after: datetime) -> datetime:
        zone = _zone(after)
        limit = after.timestamp()
        day = after.date()
        for _ in range(3):  # today, or failing that the next midnight
            midnight = datetime.combine(day, time(), tzinfo=zone)
            wall = (after.replace(tzinfo=None) - midnight.replace(tzinfo=None)).total_seconds()
            step = max(0, int(wall // self.seconds) - 1)
            while step * self.seconds < SECONDS_PER_DAY:
                # Aware arithmetic in Python is wall-clock arithmetic: the count follows the
                # clock on the wall, and the instant compared is the real one.
                candidate = midnight + timedelta(seconds=step * self.seconds)
                if candidate.timestamp() > limit:
                    return candidate
                step += 1
            day += timedelta(days=1)
        raise AssertionError("unreachable: every day has a midnight")


@dataclass(frozen=True)
class CronSchedule:
    """A 5-field cron expression."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str, *, text: str | None = None) -> CronSchedule:
        """Read ``minute hour day-of-month month day-of-week``.

        Raises:
            ValueError: a malformed field or a schedule that can never run.
        """
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(
                f'{expression!r}: expected "daily HH:MM", "every N<s|m|h|d>" or a cron '
                "expression of 5 fields (minute hour day-of-month month day-of-week)"
            )
        minute, hour, dom, month, dow = fields
        weekdays = {d % 7 for d in _field(dow, "day-of-week", 0, 7, _DAY_NAMES)}
        schedule = cls(
            text=text or expression,
            minutes=tuple(sorted(_field(minute, "minute", 0, 59))),
            hours=tuple(sorted(_field(hour, "hour", 0, 23))),
            days=frozenset(_field(dom, "day-of-month", 1, 31)),
            months=frozenset(_field(month, "month", 1, 12, _MONTH_NAMES)),
            weekdays=frozenset(weekdays),
            days_restricted=not dom.startswith("*"),
            weekdays_restricted=not dow.startswith("*"),
        )
        if not schedule._can_run():
            raise ValueError(f"{expression!r}: no month has such a day; it would never run")
        return schedule

    def _can_run(self) -> bool:
        if self.weekdays_restricted:
            return True  # some weekday falls in every month
        longest = {m: calendar.monthrange(2024, m)[1] for m in self.months}  # a leap year
        return any(d <= longest[m] for m in self.months for d in self.days)

    def runs_on(self, day: date) -> bool:
        """Whether the day-of-month, month and day-of-week fields allow ``day``."""
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return by_date or by_weekday
        return by_date and by_weekday

    def next_after(self, after: datetime) -> datetime:
        zone = _zone(after)
        limit = after.timestamp()
        day = after.date()
        for _ in range(_SEARCH_DAYS):
            if self.runs_on(day):
                # The earliest instant of the day after the limit; by instant rather than
                # by wall time, because around a clock change the two orders differ.
                best: datetime | None = None
                for hour in self.hours:
                    for minute in self.minutes:
                        candidate = datetime.combine(day, time(hour, minute), tzinfo=zone)
                        stamp = candidate.timestamp()
                        if stamp > limit and (best is None or stamp < best.timestamp()):
                            best = candidate
                if best is not None:
                    return best
            day += timedelta(days=1)
        raise ValueError(f"{self.text!r} does not run in the next {_SEARCH_DAYS} days")


def _zone(after: datetime) -> tzinfo:
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("next_after needs an aware datetime")
    return after.tzinfo


def _field(
    text: str, what: str, low: int, high: int, names: dict[str, int] | None = None
) -> set[int]:
    """The values one cron field allows."""
    values: set[int] = set()
    for part in text.split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdecimal() or int(step_text) < 1:
                raise ValueError(f"cron {what} {text!r}: the step after / must be 1 or more")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            start, _, end = base.partition("-")
            first, last = _value(start, what, low, high, names), _value(end, what, low, high, names)
            if first > last:
                raise ValueError(f"cron {what} {text!r}: range {base!r} runs backwards")
        else:
            first = _value(base, what, low, high, names)
            last = high if slash else first
        values.update(range(first, last + 1, step))
    return values


def _value(text: str, what: str, low: int, high: int, names: dict[str, int] | None) -> int:
    lowered = text.lower()
    if names is not None and lowered in names:
        return names[lowered]
    if not text.isascii() or not text.isdecimal():
        raise ValueError(f"cron {what}: {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"cron {what}: {value} is outside {low}-{high}")
    return value
