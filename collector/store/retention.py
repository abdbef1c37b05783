"""Retention: which stored backups of one database to keep and which to delete, as pure policy.

Nothing here touches the disk. The prune command lists a database's folder, turns each
backup and its manifest into a :class:`Backup`, asks :func:`plan` what to do, logs the
reasons and deletes ``plan.delete`` (oldest first). Keeping the policy pure lets the
tests run years of calendars in milliseconds and lets ``prune --dry-run`` print exactly
what a real run would do.

What is kept, for one database (a backup is kept if *any* rule holds for it):

``within``
    Every backup made within ``keep_within_days`` days of ``now``, verified or not.
    A backup dated after ``now`` (a skewed clock) always counts as within.
``last-N``
    The newest ``keep_last`` verified backups. This is the floor: no other setting
    can delete them, and ``keep_last`` may not be 0.
``daily``, ``weekly 2026-W47``, ``monthly 2026-11``
    Grandfather-father-son. Each backup belongs to the day in its name (the collector's
    time zone), that day's ISO week and its month. Only periods that hold a verified
    backup count, and of those the most recent ``keep_daily`` days, ``keep_weekly``
    weeks and ``keep_monthly`` months each keep their newest verified backup. Periods
    are counted back from the newest backup, not from ``now``: if backups stop
    arriving, pruning does not eat away the last good ones while someone notices.
``newer-than-verified``
    Every unverified backup made after the newest verified one. It may be a backup
    still being checked or one under investigation, and it is the most recent data
    there is. When no backup is verified at all, every backup is kept.
``capped``
    At most ``max_deletions`` backups are deleted per run, oldest first; the rest are
    kept this run and counted in ``RetentionPlan.capped``. A wrong clock or a mistyped
    policy thus costs a bounded number of backups before someone sees the log.

Unverified backups older than the newest verified one and outside ``keep_within_days``
fill no period and are deleted: they failed their check and a newer good one exists.

"Newest" means the latest ``made_at``; equal times are ordered by name, so the same
input always gives the same plan. Both lists of a plan are ordered oldest first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta

from common.errors import ConfigError

DEFAULTS: Mapping[str, int] = {
    "keep_daily": 7,
    "keep_weekly": 4,
    "keep_monthly": 12,
    "keep_within_days": 2,
    "keep_last": 3,
    "max_deletions": 50,
}

# Upper bounds catch typos (an extra zero or two is fine, a pasted timestamp is not) and
# keep ``now - keep_within_days`` far away from the limits of ``datetime``.
_MAXIMA: Mapping[str, int] = {
    "keep_daily": 100_000,
    "keep_weekly": 10_000,
    "keep_monthly": 10_000,
    "keep_within_days": 36_600,
    "keep_last": 100_000,
    "max_deletions": 1_000_000,
}

REASON_WITHIN = "within"
REASON_DAILY = "daily"
REASON_NEWER_THAN_VERIFIED = "newer-than-verified"
REASON_CAPPED = "capped"


def _checked(key: str, value: object, where: str) -> int:
    """Return ``value`` if it is a valid setting for ``key``.

    Raises:
        ConfigError: the value is wrong; the message starts with ``where`` and the key.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        problem = f"must be an integer, not {type(value).__name__}"
    elif value < 0:
        problem = f"must not be negative (got {value})"
    elif key == "keep_last" and value < 1:
        problem = "must be at least 1: the newest verified backup is never deleted"
    elif value > _MAXIMA[key]:
        problem = f"must be at most {_MAXIMA[key]} (got {value})"
    else:
        return value
    raise ConfigError(f"{where} {key} {problem}")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many backups of one database to keep; see the module docstring.

    Raises:
        ConfigError: a value is not an integer, is negative, is over its bound, or
            ``keep_last`` is 0. The message names the key.
    """

    keep_daily: int = DEFAULTS["keep_daily"]
    keep_weekly: int = DEFAULTS["keep_weekly"]
    keep_monthly: int = DEFAULTS["keep_monthly"]
    keep_within_days: int = DEFAULTS["keep_within_days"]
    keep_last: int = DEFAULTS["keep_last"]
    max_deletions: int = DEFAULTS["max_deletions"]

    def __post_init__(self) -> None:
        for spec in fields(self):
            _checked(spec.name, getattr(self, spec.name), "retention:")


def parse_retention(table: Mapping[str, object], source: str) -> RetentionPolicy:
    """Read the ``[retention]`` table of ``source``; missing keys take their defaults.

    Raises:
        ConfigError: an unknown key or a bad value, naming ``source`` and the key.
    """
    unknown = sorted(str(key) for key in table if key not in DEFAULTS)
    if unknown:
        known = ", ".join(DEFAULTS)
        raise ConfigError(f"{source}: [retention] unknown key {unknown[0]!r} (known keys: {known})")
    values = dict(DEFAULTS)
    for key, value in table.items():
        values[key] = _checked(key, value, f"{source}: [retention]")
    return RetentionPolicy(**values)


@dataclass(frozen=True)
class Backup:
    """One stored backup as retention sees it.

    ``made_at`` is the exact start time from the manifest (timezone-aware, UTC);
    ``day`` is the date in the file name, in the collector's time zone. Periods are
    taken from ``day``, so they match what the administrator sees in the folder.

    Raises:
        ValueError: ``made_at`` is naive.
    """

    name: str
    made_at: datetime
    day: date
    verified: bool

    def __post_init__(self) -> None:
        _require_aware(self.made_at, f"made_at of {self.name!r}")


@dataclass(frozen=True)
class RetentionPlan:
    """The outcome of :func:`plan`: every input backup is in exactly one of the lists.

    ``reasons`` maps the name of each kept backup to why it is kept, in rule order
    (``within``, ``last-N``, ``daily``, ``weekly …``, ``monthly …``,
    ``newer-than-verified``, ``capped``). ``capped`` counts the backups that would have
    been deleted but for ``max_deletions``.
    """

    keep: list[Backup]
    delete: list[Backup]
    reasons: dict[str, list[str]]
    capped: int


def plan(backups: Sequence[Backup], policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    """Decide which of one database's ``backups`` to keep and which to delete at ``now``.

    Raises:
        ValueError: ``now`` is naive, or two backups share a name (a caller bug: names
            are unique within a database's folder).
    """
    _require_aware(now, "now")
    ordered = sorted(backups, key=_age)
    _require_unique(ordered)
    verified = [backup for backup in reversed(ordered) if backup.verified]
    reasons: dict[str, list[str]] = {backup.name: [] for backup in ordered}

    def mark(chosen: Iterable[Backup], reason: str) -> None:
        for backup in chosen:
            reasons[backup.name].append(reason)

    cutoff = _within_cutoff(now, policy.keep_within_days)
    mark((b for b in ordered if b.made_at >= cutoff), REASON_WITHIN)
    mark(verified[: policy.keep_last], f"last-{policy.keep_last}")
    for label, backup in _newest_per_period(verified, policy.keep_daily, _day_period):
        reasons[backup.name].append(label)
    for label, backup in _newest_per_period(verified, policy.keep_weekly, _week_period):
        reasons[backup.name].append(label)
    for label, backup in _newest_per_period(verified, policy.keep_monthly, _month_period):
        reasons[backup.name].append(label)
    mark(_newer_than_verified(ordered, verified), REASON_NEWER_THAN_VERIFIED)

    candidates = [backup for backup in ordered if not reasons[backup.name]]
    delete = candidates[: policy.max_deletions]
    held_back = candidates[policy.max_deletions :]
    mark(held_back, REASON_CAPPED)
    keep = [backup for backup in ordered if reasons[backup.name]]
    return RetentionPlan(
        keep=keep,
        delete=delete,
        reasons={backup.name: reasons[backup.name] for backup in keep},
        capped=len(held_back),
    )


def _age(backup: Backup) -> tuple[datetime, str]:
    return backup.made_at, backup.name


def _require_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got {moment.isoformat()}")


def _require_unique(backups: Sequence[Backup]) -> None:
    seen: set[str] = set()
    for backup in backups:
        if backup.name in seen:
            raise ValueError(f"backup name {backup.name!r} appears twice")
        seen.add(backup.name)


def _within_cutoff(now: datetime, days: int) -> datetime:
    try:
        return now - timedelta(days=days)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)


# A period is a sortable key (later periods sort higher) and the label given as a reason.
_Period = tuple[tuple[int, ...], str]


def _day_period(day: date) -> _Period:
    return (day.year, day.month, day.day), REASON_DAILY


def _week_period(day: date) -> _Period:
    year, week, _ = day.isocalendar()
    return (year, week), f"weekly {year:04d}-W{week:02d}"


def _month_period(day: date) -> _Period:
    return (day.year, day.month), f"monthly {day.year:04d}-{day.month:02d}"


def _newest_per_period(
    newest_first: Sequence[Backup], count: int, period: Callable[[date], _Period]
) -> list[tuple[str, Backup]]:
    """The newest backup of each of the ``count`` most recent periods, with its label."""
    chosen: dict[tuple[int, ...], tuple[str, Backup]] = {}
    for backup in newest_first:
        key, label = period(backup.day)
        chosen.setdefault(key, (label, backup))
    recent = sorted(chosen, reverse=True)[:count]
    return [chosen[key] for key in recent]


def _newer_than_verified(ordered: Sequence[Backup], verified: Sequence[Backup]) -> list[Backup]:
    unverified = [backup for backup in ordered if not backup.verified]
    if not verified:
        return unverified
    newest = _age(verified[0])
    return [backup for backup in unverified if _age(backup) > newest]
