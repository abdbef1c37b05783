"""agent.toml's scheduling keys (schedule, random_delay, max_concurrent, record_checksums)
and the service's first plan from them."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.cli import schedule_lines
from agent.config import DEFAULT_RANDOM_DELAY, DEFAULT_SCHEDULE, load_agent_config
from agent.service import AgentService
from common.errors import ConfigError
from tests.unit.agent_toml import write_agent_toml as write


def test_defaults(tmp_path: Path) -> None:
    """A source without schedule runs daily with a random delay, marked as the default."""
    config = load_agent_config(write(tmp_path))
    assert config.max_concurrent == 1
    (source,) = config.sources
    assert source.schedule == DEFAULT_SCHEDULE == "daily 01:00"
    assert source.random_delay == DEFAULT_RANDOM_DELAY == 3600.0
    assert source.default_schedule is True
    assert source.record_checksums is False


def test_a_written_schedule_has_no_random_delay_unless_asked(tmp_path: Path) -> None:
    (source,) = load_agent_config(write(tmp_path, source='schedule = "daily 03:00"')).sources
    assert (source.schedule, source.random_delay, source.default_schedule) == (
        "daily 03:00", 0.0, False)


def test_schedule_none_leaves_the_source_to_one_shot_backups(tmp_path: Path) -> None:
    (source,) = load_agent_config(write(tmp_path, source='schedule = "none"')).sources
    assert source.schedule is None
    assert source.default_schedule is False


def test_the_default_random_delay_can_be_changed(tmp_path: Path) -> None:
    (source,) = load_agent_config(write(tmp_path, source="random_delay = 60")).sources
    assert (source.schedule, source.random_delay) == (DEFAULT_SCHEDULE, 60.0)


def test_keys_are_read(tmp_path: Path) -> None:
    config = load_agent_config(
        write(
            tmp_path,
            agent="max_concurrent = 3",
            source='schedule = "15 2 * * *"\nrandom_delay = 900\nrecord_checksums = false',
        )
    )
    assert config.max_concurrent == 3
    (source,) = config.sources
    assert source.schedule == "15 2 * * *"
    assert source.random_delay == 900.0
    assert source.record_checksums is False


@pytest.mark.parametrize(
    ("agent", "source", "complaint"),
    [
        ("", 'schedule = "daily 25:00"', r"sources\[0\]\.schedule: .*not a time of day"),
        ("", 'schedule = "every 2 weeks"', r"sources\[0\]\.schedule"),
        ("", "schedule = 5", r"sources\[0\]\.schedule must be a string"),
        ("", 'schedule = "none"\nrandom_delay = 60',
         r"sources\[0\]\.random_delay needs a schedule"),
        ("", 'schedule = "every 6h"\nrandom_delay = -1', r"random_delay must be at least"),
        ("max_concurrent = 0", "", r"agent\.max_concurrent must be between 1 and 64"),
        ("", 'record_checksums = "yes"', r"record_checksums must be true or false"),
    ],
)
def test_bad_values_stop_start_up_naming_the_key(
    tmp_path: Path, agent: str, source: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load_agent_config(write(tmp_path, agent=agent, source=source))


def test_record_checksums_is_a_mysql_key(tmp_path: Path) -> None:
    path = write(tmp_path, source="record_checksums = true")
    path.write_text(path.read_text().replace(
        'engine = "mysql"\nuser = "backup"', 'engine = "mongodb"\nuri = "mongodb://127.0.0.1"'
    ))
    with pytest.raises(ConfigError, match="record_checksums: unknown key"):
        load_agent_config(path)


async def test_service_plans_each_scheduled_source_with_its_random_delay(tmp_path: Path) -> None:
    """The first run is the schedule's next time, held back by at most random_delay."""
    config = load_agent_config(
        write(tmp_path, source='schedule = "daily 02:30"\nrandom_delay = 600')
    )
    now = datetime(2026, 11, 26, 1, 0, tzinfo=UTC).timestamp()
    starts = []
    for seed in range(20):
        service = AgentService(config, zone=UTC, clock=lambda: now, rng=random.Random(seed))
        ((name, fire, start),) = service.upcoming()
        assert name == "main"
        assert fire == datetime(2026, 11, 26, 2, 30, tzinfo=UTC)
        assert fire.timestamp() <= start <= fire.timestamp() + 600
        starts.append(start)
    assert len(set(starts)) > 1


def test_service_needs_a_scheduled_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no source has a schedule"):
        AgentService(load_agent_config(write(tmp_path, source='schedule = "none"')))


def test_check_config_lines_show_each_sources_next_run(tmp_path: Path) -> None:
    """check-config's schedule lines: the default marked as such, with its delay; a
    source with schedule = "none" says only one-shot backups run it."""
    config = load_agent_config(write(tmp_path, source='\n[[sources]]\nname = "manual"\n'
                                     'engine = "mysql"\nuser = "u"\ndatabases = "all"\n'
                                     'schedule = "none"\n'))
    now = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)
    assert schedule_lines(config, now) == [
        "source main: schedule 'daily 01:00' (the default), next run 2026-11-27 01:00 UTC"
        " + up to 3600 s",
        "source manual: no schedule; only `backhaul-agent backup` runs it",
    ]
