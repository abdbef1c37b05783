"""Tests for the pure retention policy: config parsing, hand-computed calendars, properties."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.store.retention import (
    DEFAULTS,
    Backup,
    RetentionPlan,
    RetentionPolicy,
    parse_retention,
    plan,
)
from common.errors import ConfigError

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
UNLIMITED = 1_000_000


def make(day: str, *, n: int = 1, at: str = "01:30", verified: bool = True) -> Backup:
    """A backup of ``hospital`` made at ``at`` UTC on ``day``, the ``n``-th of that day."""
    made_on = date.fromisoformat(day)
    suffix = "" if n == 1 else f"-{n}"
    return Backup(
        name=f"hospital_{made_on:%Y%m%d}{suffix}.sql.zst",
        made_at=datetime.combine(made_on, time.fromisoformat(at), tzinfo=UTC),
        day=made_on,
        verified=verified,
    )


def names(*stems: str) -> set[str]:
    return {f"hospital_{stem}.sql.zst" for stem in stems}


def name_set(backups: Iterable[Backup]) -> set[str]:
    return {backup.name for backup in backups}


def policy(**overrides: int) -> RetentionPolicy:
    values = dict(DEFAULTS)
    values.update(overrides)
    return RetentionPolicy(**values)


# --- configuration -----------------------------------------------------------------------


def test_parse_retention_fills_defaults_for_an_empty_table() -> None:
    parsed = parse_retention({}, "/etc/backhaul/collector.toml")
    assert parsed == RetentionPolicy(
        keep_daily=7,
        keep_weekly=4,
        keep_monthly=12,
        keep_within_days=2,
        keep_last=3,
        max_deletions=50,
    )


def test_parse_retention_reads_every_key() -> None:
    table: dict[str, object] = {
        "keep_daily": 14,
        "keep_weekly": 8,
        "keep_monthly": 24,
        "keep_within_days": 0,
        "keep_last": 1,
        "max_deletions": 0,
    }
    assert parse_retention(table, "c.toml") == RetentionPolicy(14, 8, 24, 0, 1, 0)


def test_parse_retention_rejects_an_unknown_key_naming_file_and_key() -> None:
    with pytest.raises(ConfigError, match=r"c\.toml: \[retention\] unknown key 'keep_yearly'"):
        parse_retention({"keep_daily": 3, "keep_yearly": 2}, "c.toml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("keep_daily", -1, "must not be negative"),
        ("keep_weekly", 1.5, "must be an integer, not float"),
        ("keep_monthly", "12", "must be an integer, not str"),
        ("max_deletions", True, "must be an integer, not bool"),
        ("keep_last", 0, "must be at least 1"),
        ("keep_within_days", 10**12, "must be at most"),
    ],
)
def test_parse_retention_rejects_bad_values_naming_file_and_key(
    key: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"c\.toml: \[retention\] {key} {message}"):
        parse_retention({key: value}, "c.toml")


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_policy_rejects_a_negative_value_naming_the_key(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"retention: {key} must not be negative"):
        policy(**{key: -1})


# --- a hand-computed calendar ------------------------------------------------------------
#
# 400 days, 2025-10-23 (Thu) to 2026-11-26 (Thu), one backup at 01:30 UTC each day, with:
#   missing days:  2026-10-31, 2026-11-22 and all of February 2026 (an outage);
#   unverified:    2025-11-30, 2026-11-15, 2026-11-20, and today's 2026-11-26;
#   second backup: 2026-11-14-2 at 14:00, 2026-11-25-2 at 13:00 (verified),
#                  2026-09-30-2 at 22:00 (unverified).
# ISO weeks: W48 is 11-23..11-29, W47 is 11-16..11-22, W46 is 11-09..11-15, W45 11-02..11-08.

FIRST_DAY = date(2025, 10, 23)
LAST_DAY = date(2026, 11, 26)
MISSING = {date(2026, 10, 31), date(2026, 11, 22)} | {date(2026, 2, d) for d in range(1, 29)}
UNVERIFIED = {date(2025, 11, 30), date(2026, 11, 15), date(2026, 11, 20), date(2026, 11, 26)}


def calendar() -> list[Backup]:
    backups = []
    day = FIRST_DAY
    while day <= LAST_DAY:
        if day not in MISSING:
            backups.append(make(day.isoformat(), verified=day not in UNVERIFIED))
        day += timedelta(days=1)
    backups.append(make("2026-11-14", n=2, at="14:00"))
    backups.append(make("2026-11-25", n=2, at="13:00"))
    backups.append(make("2026-09-30", n=2, at="22:00", verified=False))
    return backups


# Worked out by hand from the rules in collector/store/retention.py's docstring.
EXPECTED_DEFAULT_KEEP = names(
    # monthly: newest verified of the 12 most recent months with one (February is empty)
    "20251129",
    "20251231",
    "20260131",
    "20260331",
    "20260430",
    "20260531",
    "20260630",
    "20260731",
    "20260831",
    "20260930",
    "20261030",
    # weekly: W45, W46 (11-15 unverified, so the second backup of 11-14), W47 (11-22
    # missing), W48 (11-26 unverified)
    "20261108",
    "20261114-2",
    "20261121",
    # daily: 25, 24, 23, 21, 19, 18, 17 (22 missing, 20 unverified)
    "20261117",
    "20261118",
    "20261119",
    "20261123",
    "20261124",
    "20261125-2",
    # last-3 adds 20261125; within (since 11-24 12:00) adds nothing new;
    # 20261126 is unverified and newer than the newest verified backup.
    "20261125",
    "20261126",
)


def test_calendar_has_400_days() -> None:
    assert (LAST_DAY - FIRST_DAY).days + 1 == 400
    assert len(calendar()) == 400 - len(MISSING) + 3


def test_default_policy_keeps_the_hand_computed_set() -> None:
    result = plan(calendar(), policy(max_deletions=UNLIMITED), NOW)
    assert name_set(result.keep) == EXPECTED_DEFAULT_KEEP
    assert len(result.delete) == len(calendar()) - len(EXPECTED_DEFAULT_KEEP)
    assert result.capped == 0


def test_default_policy_gives_the_hand_computed_reasons() -> None:
    reasons = plan(calendar(), policy(max_deletions=UNLIMITED), NOW).reasons
    (today,) = names("20261126")
    (second_of_25,) = names("20261125-2")
    (first_of_25,) = names("20261125")
    (first_of_24,) = names("20261124")
    (second_of_14,) = names("20261114-2")
    (november_2025,) = names("20251129")
    assert reasons[second_of_25] == [
        "within",
        "last-3",
        "daily",
        "weekly 2026-W48",
        "monthly 2026-11",
    ]
    assert reasons[first_of_25] == ["within", "last-3"]
    assert reasons[first_of_24] == ["last-3", "daily"]
    assert reasons[today] == ["within", "newer-than-verified"]
    assert reasons[second_of_14] == ["weekly 2026-W46"]
    assert reasons[november_2025] == ["monthly 2025-11"]


def test_max_deletions_deletes_the_oldest_and_holds_back_the_rest() -> None:
    result = plan(calendar(), policy(), NOW)
    october = [f"202510{d:02d}" for d in range(23, 32)]
    november = [f"202511{d:02d}" for d in range(1, 29)] + ["20251130"]
    december = [f"202512{d:02d}" for d in range(1, 13)]
    assert [b.name for b in result.delete] == sorted(names(*october, *november, *december))
    assert len(result.delete) == 50
    assert result.capped == len(calendar()) - len(EXPECTED_DEFAULT_KEEP) - 50
    (first_held_back,) = names("20251213")
    assert result.reasons[first_held_back] == ["capped"]


def test_tightest_policy_keeps_newest_verified_and_newer_unverified() -> None:
    tight = policy(
        keep_daily=0,
        keep_weekly=0,
        keep_monthly=0,
        keep_within_days=0,
        keep_last=1,
        max_deletions=UNLIMITED,
    )
    result = plan(calendar(), tight, NOW)
    assert name_set(result.keep) == names("20261125-2", "20261126")


def test_backups_that_stop_arriving_are_not_eaten_by_pruning() -> None:
    """Periods count back from the newest backup, so months later the same set remains."""
    later = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    result = plan(calendar(), policy(max_deletions=UNLIMITED), later)
    assert name_set(result.keep) == EXPECTED_DEFAULT_KEEP


def test_nothing_is_deleted_when_no_backup_is_verified() -> None:
    backups = [make(f"2026-11-{d:02d}", verified=False) for d in range(1, 21)]
    result = plan(backups, policy(max_deletions=UNLIMITED), NOW)
    assert result.delete == []
    assert all(reasons == ["newer-than-verified"] for reasons in result.reasons.values())


def test_unverified_backup_older_than_a_verified_one_is_deleted() -> None:
    old_bad = make("2026-11-01", verified=False)
    good = [make(f"2026-11-{d:02d}") for d in range(2, 6)]
    result = plan([old_bad, *good], policy(max_deletions=UNLIMITED), NOW)
    assert result.delete == [old_bad]


def test_time_advancing_lets_the_within_window_expire() -> None:
    backups = [make("2026-11-25"), make("2026-11-25", n=2, at="02:00")]
    only_within = policy(
        keep_daily=0, keep_weekly=0, keep_monthly=0, keep_within_days=2, keep_last=1
    )
    assert plan(backups, only_within, NOW).delete == []
    later = plan(backups, only_within, NOW + timedelta(days=3))
    assert later.delete == [backups[0]]


def test_plan_rejects_a_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan([], policy(), datetime(2026, 11, 26))


def test_backup_rejects_a_naive_made_at() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Backup("x", datetime(2026, 11, 26), date(2026, 11, 26), verified=True)


def test_plan_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        plan([make("2026-11-25"), make("2026-11-25", at="03:00")], policy(), NOW)


# --- nightly pruning over a random calendar ----------------------------------------------


def random_calendar(seed: int, days: int = 400) -> list[Backup]:
    """``days`` nights ending on NOW's date: ~10% missing, ~7% doubled, ~5% unverified."""
    rng = random.Random(seed)
    backups = []
    for offset in range(days):
        day = NOW.date() - timedelta(days=days - 1 - offset)
        if rng.random() < 0.10:
            continue
        count = 2 if rng.random() < 0.07 else 1
        for n in range(1, count + 1):
            at = f"{n:02d}:{rng.randrange(60):02d}"
            backups.append(make(day.isoformat(), n=n, at=at, verified=rng.random() >= 0.05))
    return backups


def reference_keep(backups: Sequence[Backup], rules: RetentionPolicy, now: datetime) -> set[str]:
    """The kept set, computed rule by rule from the definitions, without the capping."""

    def newest(group: Iterable[Backup]) -> Backup:
        return max(group, key=lambda b: (b.made_at, b.name))

    verified = [b for b in backups if b.verified]
    keep: set[str] = set()
    for period, count in (
        (lambda d: d, rules.keep_daily),
        (lambda d: d.isocalendar()[:2], rules.keep_weekly),
        (lambda d: (d.year, d.month), rules.keep_monthly),
    ):
        periods = sorted({period(b.day) for b in verified}, reverse=True)[:count]
        for wanted in periods:
            keep.add(newest(b for b in verified if period(b.day) == wanted).name)
    ranked = sorted(verified, key=lambda b: (b.made_at, b.name), reverse=True)
    keep |= name_set(ranked[: rules.keep_last])
    keep |= {b.name for b in backups if b.made_at >= now - timedelta(days=rules.keep_within_days)}
    last_good = ranked[0] if ranked else None
    keep |= {
        b.name
        for b in backups
        if not b.verified
        and (last_good is None or (b.made_at, b.name) > (last_good.made_at, last_good.name))
    }
    return keep


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_plan_matches_the_rules_on_a_random_calendar(seed: int) -> None:
    backups = random_calendar(seed)
    rules = policy(max_deletions=UNLIMITED)
    assert name_set(plan(backups, rules, NOW).keep) == reference_keep(backups, rules, NOW)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_nightly_pruning_ends_where_one_plan_over_the_history_ends(seed: int) -> None:
    """Pruning every night, as the timer does, keeps what one plan over all of it keeps."""
    history = random_calendar(seed)
    rules = policy()
    store: list[Backup] = []
    first = history[0].day
    for offset in range((NOW.date() - first).days + 1):
        night = datetime.combine(first + timedelta(days=offset), time(7, 30), tzinfo=UTC)
        store += [b for b in history if b.day == night.date()]
        result = plan(store, rules, night)
        assert_invariants(store, rules, night, result)
        store = result.keep
    final = plan(history, policy(max_deletions=UNLIMITED), NOW.replace(hour=7, minute=30))
    assert name_set(store) == name_set(final.keep)


# --- properties --------------------------------------------------------------------------


def newest_verified(backups: Sequence[Backup], count: int) -> list[Backup]:
    verified = [b for b in backups if b.verified]
    return sorted(verified, key=lambda b: (b.made_at, b.name), reverse=True)[:count]


def assert_invariants(
    backups: Sequence[Backup], rules: RetentionPolicy, now: datetime, result: RetentionPlan
) -> None:
    kept, deleted = name_set(result.keep), name_set(result.delete)
    assert kept | deleted == name_set(backups)
    assert not kept & deleted
    assert len(result.keep) + len(result.delete) == len(backups)
    assert name_set(newest_verified(backups, rules.keep_last)) <= kept
    cutoff = now - timedelta(days=rules.keep_within_days)
    assert all(b.made_at < cutoff for b in result.delete)
    assert len(result.delete) <= rules.max_deletions
    assert set(result.reasons) == kept
    assert all(result.reasons[name] for name in kept)
    assert result.capped == sum("capped" in reasons for reasons in result.reasons.values())
    last_good = newest_verified(backups, 1)
    assert all(
        b.verified
        or (last_good and (b.made_at, b.name) < (last_good[0].made_at, last_good[0].name))
        for b in result.delete
    )
    for listed in (result.keep, result.delete):
        assert listed == sorted(listed, key=lambda b: (b.made_at, b.name))


BASE = datetime(2026, 1, 1, tzinfo=UTC)
ZONES = [timezone(timedelta(hours=h)) for h in (-10, -5, 0, 1, 9, 14)]


@st.composite
def backup_sets(draw: st.DrawFn) -> list[Backup]:
    """Backups over ~4 months, dated in a collector zone, named and suffixed as stored."""
    zone = draw(st.sampled_from(ZONES))
    minutes = draw(st.lists(st.integers(0, 120 * 24 * 60), max_size=60, unique=True))
    backups: list[Backup] = []
    per_day: dict[date, int] = {}
    for minute in sorted(minutes):
        made_at = BASE + timedelta(minutes=minute)
        day = made_at.astimezone(zone).date()
        per_day[day] = per_day.get(day, 0) + 1
        suffix = "" if per_day[day] == 1 else f"-{per_day[day]}"
        backups.append(
            Backup(f"db_{day:%Y%m%d}{suffix}.sql.zst", made_at, day, draw(st.booleans()))
        )
    return draw(st.permutations(backups))


policies = st.builds(
    RetentionPolicy,
    keep_daily=st.integers(0, 10),
    keep_weekly=st.integers(0, 6),
    keep_monthly=st.integers(0, 4),
    keep_within_days=st.integers(0, 10),
    keep_last=st.integers(1, 5),
    max_deletions=st.integers(0, 40),
)
moments = st.integers(-5 * 24 * 60, 140 * 24 * 60).map(lambda m: BASE + timedelta(minutes=m))


@settings(max_examples=300)
@given(backups=backup_sets(), rules=policies, now=moments)
def test_plan_invariants_hold_for_any_input(
    backups: list[Backup], rules: RetentionPolicy, now: datetime
) -> None:
    """Partition, floor, within window, deletion cap, unverified-newest and ordering."""
    assert_invariants(backups, rules, now, plan(backups, rules, now))


@settings(max_examples=300)
@given(backups=backup_sets(), rules=policies, now=moments)
def test_plan_matches_the_rules_when_nothing_is_capped(
    backups: list[Backup], rules: RetentionPolicy, now: datetime
) -> None:
    uncapped = dataclasses.replace(rules, max_deletions=UNLIMITED)
    result = plan(backups, uncapped, now)
    assert name_set(result.keep) == reference_keep(backups, uncapped, now)


@settings(max_examples=300)
@given(backups=backup_sets(), rules=policies, now=moments)
def test_planning_the_kept_set_again_deletes_only_what_was_held_back(
    backups: list[Backup], rules: RetentionPolicy, now: datetime
) -> None:
    first = plan(backups, rules, now)
    second = plan(first.keep, rules, now)
    held_back = [b for b in first.keep if first.reasons[b.name] == ["capped"]]
    assert second.delete == held_back[: rules.max_deletions]
    if first.capped == 0:
        assert second.delete == []


@given(backups=backup_sets(), rules=policies, now=moments, seed=st.randoms())
def test_plan_does_not_depend_on_input_order(
    backups: list[Backup], rules: RetentionPolicy, now: datetime, seed: random.Random
) -> None:
    shuffled = list(backups)
    seed.shuffle(shuffled)
    assert plan(shuffled, rules, now) == plan(backups, rules, now)
