"""agent.toml's keys for second chances: retry_failed, retry_interval and catch_up per
source, and [agent] state_dir and run_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.schedule import parse_duration
from common.errors import ConfigError
from tests.unit.agent_toml import write_agent_toml


def write(tmp_path: Path, *, agent: str = "", source: str = "") -> Path:
    # A written schedule, so that no default random delay comes into these tests.
    return write_agent_toml(
        tmp_path, agent=agent, source=f'schedule = "daily 02:30"\n{source}'
    )


def test_defaults_retry_twice_after_ten_minutes_and_catch_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    config = load_agent_config(write(tmp_path))
    (source,) = config.sources
    assert (source.retry_failed, source.retry_interval, source.catch_up) == (2, 600.0, True)
    assert config.state_dir == Path("/var/lib/backhaul/agent")
    assert config.run_dir == Path("/run/backhaul-agent")


def test_systemd_directories_are_the_defaults_when_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/backhaul/agent:/var/lib/other")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/elsewhere")
    config = load_agent_config(write(tmp_path))
    assert config.state_dir == Path("/var/lib/backhaul/agent")
    assert config.run_dir == Path("/run/elsewhere")


def test_keys_are_read(tmp_path: Path) -> None:
    config = load_agent_config(
        write(
            tmp_path,
            agent='state_dir = "state"\nrun_dir = "/run/x"',
            source='retry_failed = 0\nretry_interval = "2s"\ncatch_up = false',
        )
    )
    (source,) = config.sources
    assert (source.retry_failed, source.retry_interval, source.catch_up) == (0, 2.0, False)
    assert config.state_dir == tmp_path / "state"
    assert config.run_dir == Path("/run/x")


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("retry_failed = -1", r"sources\[0\]\.retry_failed must be between 0 and 20"),
        ('retry_failed = "2"', r"sources\[0\]\.retry_failed must be an integer"),
        ('retry_interval = "10 minutes"', r"sources\[0\]\.retry_interval: .*a count and a unit"),
        ("retry_interval = 600", r"sources\[0\]\.retry_interval must be a string"),
        ('catch_up = "no"', r"sources\[0\]\.catch_up must be true or false"),
    ],
)
def test_bad_values_stop_start_up_naming_the_key(
    tmp_path: Path, source: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        load_agent_config(write(tmp_path, source=source))


@pytest.mark.parametrize(
    ("text", "seconds"), [("10m", 600), ("2s", 2), ("1 h", 3600), ("1D", 86400)]
)
def test_durations_read_as_every_takes_them(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "0s", "-1m", "1.5h", "10 minutes"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="a count and a unit"):
        parse_duration(text)
