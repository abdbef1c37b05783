"""What the collector expects of each database: how often a backup arrives, how far it may shrink.

The collector exports these as metrics (``backhaul_backup_expected_interval_seconds`` and
``backhaul_backup_shrink_factor``) so that the shipped alert rules judge each database
against its own schedule: a weekly database is not missing on day 2, an hourly one is
missing after about two hours. They come from ``collector.toml``, not from the agents,
because the collector is the side a compromised database host cannot silence.

In an ``[[agents]]`` table::

    expected_interval = "1d"      # the agent's default; daily when not set
    shrink_factor = 0.5           # alert below this share of the 7-day largest backup
    [agents.expected_intervals]   # per-database overrides
    audit = "7d"
    orders = "1h"

A duration is a whole number of seconds or a count with a unit: ``s``, ``m``, ``h``, ``d``
or ``w`` (``"90m"``, ``"1d"``, ``"2w"``). Everything here is pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_SHRINK_FACTOR",
    "AgentExpectations",
    "Expectation",
    "parse_agent_expectations",
    "parse_duration",
]

DEFAULT_INTERVAL = 86_400.0
"""Daily: what a database is expected to do when the configuration says nothing."""

DEFAULT_SHRINK_FACTOR = 0.5
"""A backup under half of the largest of the last 7 days is suspicious."""

MIN_INTERVAL = 60.0  # Prometheus scrapes every 15-60 s: a shorter promise cannot be checked
MAX_INTERVAL = 366 * 86_400.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION_RE = re.compile(r"\A([1-9][0-9]{0,6})\s*([smhdw])\Z")


@dataclass(frozen=True)
class Expectation:
    """What one database is expected to do."""

    interval_s: float = DEFAULT_INTERVAL
    shrink_factor: float = DEFAULT_SHRINK_FACTOR


@dataclass(frozen=True)
class AgentExpectations:
    """One agent's default and its per-database overrides."""

    default: Expectation = field(default_factory=Expectation)
    intervals: tuple[tuple[str, float], ...] = ()  # (database, seconds) overrides

    def for_database(self, database: str) -> Expectation:
        interval = dict(self.intervals).get(database, self.default.interval_s)
        return Expectation(interval, self.default.shrink_factor)


def parse_duration(value: object, where: str) -> float:
    """Seconds from a whole number of seconds or a string such as ``"7d"``.

    Raises:
        ConfigError: not a duration, or outside one minute to 366 days.
    """
    seconds: float
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value.strip().lower())):
        seconds = float(int(match[1]) * _UNITS[match[2]])
    else:
        raise ConfigError(
            f'{where} must be a number of seconds or a count and a unit s, m, h, d or w '
            f'(e.g. "1d"), got {value!r}'
        )
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise ConfigError(f"{where} must be between 1 minute and 366 days, got {value!r}")
    return seconds


def parse_agent_expectations(
    raw: Mapping[str, Any], databases: Sequence[str] | None, where: str
) -> AgentExpectations:
    """Read ``expected_interval``, ``shrink_factor`` and ``expected_intervals`` of one agent.

    ``raw`` holds just those keys (absent ones take the defaults); ``where`` names the
    agent's table in messages, e.g. ``"collector.toml: agents[0]."``.

    Raises:
        ConfigError: a bad duration or factor, or an override for a database that is not
            in the agent's ``databases`` list (it would export nothing and judge nothing).
    """
    interval = DEFAULT_INTERVAL
    if "expected_interval" in raw:
        interval = parse_duration(raw["expected_interval"], f"{where}expected_interval")
    factor = _shrink_factor(raw.get("shrink_factor", DEFAULT_SHRINK_FACTOR), where)
    overrides = raw.get("expected_intervals", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}expected_intervals must be a table of database = duration")
    known = set(databases or ())
    intervals: list[tuple[str, float]] = []
    for database, value in overrides.items():
        key = f"{where}expected_intervals.{database}"
        if database not in known:
            raise ConfigError(
                f"{key}: {database!r} is not in this agent's databases list; only listed "
                "databases are expected, so only they can have their own interval"
            )
        intervals.append((database, parse_duration(value, key)))
    return AgentExpectations(Expectation(interval, factor), tuple(intervals))


def _shrink_factor(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(
            f"{where}shrink_factor must be a number above 0 and below 1 (0.5 alerts on a "
            f"backup under half of the week's largest), got {value!r}"
        )
    return float(value)
