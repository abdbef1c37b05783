"""Schedules: parsing `daily`, `every` and cron, and the next run, across clock changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.schedule import CronSchedule, EverySchedule, parse_schedule

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold)


def runs(schedule_text: str, start: datetime, count: int) -> list[str]:
    schedule = parse_schedule(schedule_text)
    out, when = [], start
    for _ in range(count):
        when = schedule.next_after(when)
        out.append(when.isoformat())
    return out


def test_daily_runs_at_its_time_today_then_tomorrow() -> None:
    assert runs("daily 02:30", at("2026-11-26T01:00:00"), 2) == [
        "2026-11-26T02:30:00+01:00",
        "2026-11-27T02:30:00+01:00",
    ]


def test_next_run_is_strictly_after_the_given_instant() -> None:
    """At 02:30:00 exactly, the 02:30 run is the one just made: the next is tomorrow."""
    assert runs("daily 02:30", at("2026-11-26T02:30:00"), 1) == ["2026-11-27T02:30:00+01:00"]
    assert runs("daily 02:30", at("2026-11-26T02:29:59"), 1) == ["2026-11-26T02:30:00+01:00"]


def test_every_hours_counts_from_local_midnight() -> None:
    assert runs("every 6h", at("2026-11-26T05:10:00"), 4) == [
        "2026-11-26T06:00:00+01:00",
        "2026-11-26T12:00:00+01:00",
        "2026-11-26T18:00:00+01:00",
        "2026-11-27T00:00:00+01:00",
    ]


def test_every_interval_that_does_not_divide_a_day_restarts_at_midnight() -> None:
    assert runs("every 7h", at("2026-11-26T20:00:00"), 3) == [
        "2026-11-26T21:00:00+01:00",
        "2026-11-27T00:00:00+01:00",
        "2026-11-27T07:00:00+01:00",
    ]


def test_every_minutes_and_seconds() -> None:
    assert runs("every 30m", at("2026-11-26T10:29:59"), 2) == [
        "2026-11-26T10:30:00+01:00",
        "2026-11-26T11:00:00+01:00",
    ]
    assert runs("every 2s", at("2026-11-26T10:00:01.500000"), 2) == [
        "2026-11-26T10:00:02+01:00",
        "2026-11-26T10:00:04+01:00",
    ]


def test_cron_fields_lists_ranges_steps_and_names() -> None:
    schedule = parse_schedule("*/20 8-18/5 * jan,dec mon-fri")
    assert isinstance(schedule, CronSchedule)
    assert schedule.minutes == (0, 20, 40)
    assert schedule.hours == (8, 13, 18)
    assert schedule.months == {1, 12}
    assert schedule.weekdays == {1, 2, 3, 4, 5}
    # Friday 2026-12-04 18:40, then Monday 08:00.
    assert runs("*/20 8-18/5 * jan,dec mon-fri", at("2026-12-04T18:21:00"), 2) == [
        "2026-12-04T18:40:00+01:00",
        "2026-12-07T08:00:00+01:00",
    ]


def test_cron_sunday_is_0_and_7() -> None:
    assert parse_schedule("0 3 * * 7").next_after(at("2026-11-26T00:00:00")) == at(
        "2026-11-29T03:00:00"
    )
    assert parse_schedule("0 3 * * 5-7").weekdays == {5, 6, 0}  # type: ignore[attr-defined]


def test_cron_day_of_month_or_day_of_week_when_both_restricted() -> None:
    """Vixie cron: '0 0 1 * mon' runs on the 1st and on every Monday."""
    assert runs("0 0 1 * mon", at("2026-11-26T12:00:00"), 3) == [
        "2026-11-30T00:00:00+01:00",  # a Monday
        "2026-12-01T00:00:00+01:00",  # the 1st, a Tuesday
        "2026-12-07T00:00:00+01:00",
    ]


def test_cron_single_value_with_step_runs_to_the_end_of_the_range() -> None:
    assert parse_schedule("5/20 * * * *").minutes == (5, 25, 45)  # type: ignore[attr-defined]


def test_leap_day_is_found_years_ahead() -> None:
    assert parse_schedule("0 0 29 2 *").next_after(at("2026-03-01T00:00:00")) == at(
        "2028-02-29T00:00:00"
    )


def test_shorthands() -> None:
    assert runs("@daily", at("2026-11-26T12:00:00"), 1) == ["2026-11-27T00:00:00+01:00"]
    assert runs("@hourly", at("2026-11-26T12:00:00"), 1) == ["2026-11-26T13:00:00+01:00"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("daily 2:3", "daily HH:MM"),
        ("daily 24:00", "not a time of day"),
        ("daily", "daily HH:MM"),
        ("every 6", "every N"),
        ("every 0h", "every N"),
        ("every 2w", "every N"),
        ("every 25h", "longer than a day"),
        ("* * * *", "5 fields"),
        ("60 * * * *", "outside 0-59"),
        ("* 24 * * *", "outside 0-23"),
        ("* * 0 * *", "outside 1-31"),
        ("* * * 13 *", "outside 1-12"),
        ("* * * * 8", "outside 0-7"),
        ("*/0 * * * *", "step"),
        ("5-1 * * * *", "backwards"),
        ("a * * * *", "not a number"),
        ("1,,2 * * * *", "not a number"),
        ("0 0 31 2 *", "never run"),
        ("0 0 30 2,4 *", None),  # 30 April exists: fine
        ("@yearly", "unknown shorthand"),
        ("", "5 fields"),
    ],
)
def test_bad_schedules_are_refused_with_a_reason(text: str, complaint: str | None) -> None:
    if complaint is None:
        parse_schedule(text)
        return
    with pytest.raises(ValueError, match=complaint):
        parse_schedule(text)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        parse_schedule("daily 02:30").next_after(datetime(2026, 11, 26))


def test_spring_forward_gap_runs_once_an_hour_later() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: it runs at 03:30 CEST, once."""
    first = parse_schedule("daily 02:30").next_after(at("2026-03-29T01:00:00"))
    assert first.astimezone(UTC) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST
    second = parse_schedule("daily 02:30").next_after(first)
    assert second == at("2026-03-30T02:30:00")


def test_fall_back_ambiguous_time_runs_once() -> None:
    """02:30 happens twice on 2026-10-25 in Berlin: the first one runs, the second not."""
    schedule = parse_schedule("daily 02:30")
    first = schedule.next_after(at("2026-10-25T01:00:00"))
    assert first.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # CEST
    second = schedule.next_after(first)
    assert second == at("2026-10-26T02:30:00")


def test_every_across_fall_back_never_runs_backwards() -> None:
    schedule = parse_schedule("every 30m")
    when = at("2026-10-25T01:00:00")
    stamps = []
    for _ in range(8):
        when = schedule.next_after(when)
        stamps.append(when.timestamp())
    assert stamps == sorted(set(stamps))


def test_every_across_spring_forward_keeps_wall_clock_times() -> None:
    times = runs("every 1h", at("2026-03-29T00:30:00"), 3)
    assert times[0] == "2026-03-29T01:00:00+01:00"
    assert times[-1] == "2026-03-29T04:00:00+02:00"


@settings(max_examples=200, deadline=None)
@given(
    minute=st.sampled_from(["*", "0", "*/15", "5-10", "1,31,59"]),
    hour=st.sampled_from(["*", "2", "*/6", "8-18"]),
    dom=st.sampled_from(["*", "1", "15", "1-7", "31"]),
    dow=st.sampled_from(["*", "0", "mon-fri", "6"]),
    offset=st.integers(min_value=0, max_value=5 * 365 * 86_400),
)
def test_cron_next_run_matches_and_nothing_earlier_does(
    minute: str, hour: str, dom: str, dow: str, offset: int
) -> None:
    """The answer matches every field, and no matching minute lies between."""
    schedule = CronSchedule.parse(f"{minute} {hour} {dom} * {dow}")
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=offset)
    found = schedule.next_after(start)
    assert found > start
    assert found.minute in schedule.minutes and found.hour in schedule.hours
    assert schedule.runs_on(found.date())
    probe = (start + timedelta(minutes=1)).replace(second=0, microsecond=0)
    steps = 0
    while probe < found and steps < 2000:
        assert not (
            probe.minute in schedule.minutes
            and probe.hour in schedule.hours
            and schedule.runs_on(probe.date())
        )
        probe += timedelta(minutes=1)
        steps += 1


@settings(max_examples=200, deadline=None)
@given(
    seconds=st.sampled_from([1, 2, 45, 60, 300, 3600, 7 * 3600, 86_400]),
    offset=st.integers(min_value=0, max_value=3 * 365 * 86_400),
)
def test_every_next_run_is_on_the_grid_and_within_one_interval(seconds: int, offset: int) -> None:
    schedule = EverySchedule(f"every {seconds}s", seconds)
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=offset, microseconds=1)
    found = schedule.next_after(start)
    since_midnight = found.hour * 3600 + found.minute * 60 + found.second
    assert found > start
    assert found - start <= timedelta(seconds=seconds)
    assert since_midnight % seconds == 0
