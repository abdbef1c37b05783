"""Per-database expectations: durations, shrink factors and their place in collector.toml."""

from __future__ import annotations

import textwrap
from pathlib import Path

import asyncssh
import pytest

from collector.config import load_collector_config
from collector.report.expectations import (
    AgentExpectations,
    Expectation,
    parse_agent_expectations,
    parse_duration,
)
from common.errors import ConfigError

WHERE = "collector.toml: agents[0]."


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1d", 86400), ("7d", 604800), ("1h", 3600), ("90m", 5400), ("2w", 1209600),
     ("120s", 120), (3600, 3600), (" 1H ", 3600)],
)
def test_duration_accepts_seconds_or_a_count_and_unit(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize(
    "value", ["", "1", "1y", "d", "0d", "-1d", "1.5d", "1 day", True, 1.5, "59s", 59, "367d"]
)
def test_duration_refuses_anything_else_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"agents\[0\]\.expected_interval"):
        parse_duration(value, f"{WHERE}expected_interval")


def test_nothing_configured_means_daily_and_half() -> None:
    parsed = parse_agent_expectations({}, ["hospital"], WHERE)
    assert parsed == AgentExpectations()
    assert parsed.for_database("hospital") == Expectation(86400.0, 0.5)


def test_database_override_wins_over_the_agent_default() -> None:
    parsed = parse_agent_expectations(
        {"expected_interval": "1h", "shrink_factor": 0.25,
         "expected_intervals": {"audit": "7d"}},
        ["orders", "audit"], WHERE,
    )  # fmt: skip
    assert parsed.for_database("orders") == Expectation(3600.0, 0.25)
    assert parsed.for_database("audit") == Expectation(7 * 86400.0, 0.25)


def test_override_for_an_unlisted_database_is_refused() -> None:
    """An override nobody exports would look like protection and be none."""
    with pytest.raises(ConfigError, match=r"expected_intervals\.audit.*not in this agent"):
        parse_agent_expectations({"expected_intervals": {"audit": "7d"}}, ["orders"], WHERE)
    with pytest.raises(ConfigError, match="not in this agent"):
        parse_agent_expectations({"expected_intervals": {"audit": "7d"}}, None, WHERE)


@pytest.mark.parametrize("factor", [0, 1, 1.5, -0.1, "0.5", True])
def test_shrink_factor_must_lie_strictly_between_zero_and_one(factor: object) -> None:
    with pytest.raises(ConfigError, match=r"agents\[0\]\.shrink_factor"):
        parse_agent_expectations({"shrink_factor": factor}, ["orders"], WHERE)


def test_expected_intervals_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="expected_intervals must be a table"):
        parse_agent_expectations({"expected_intervals": ["7d"]}, ["orders"], WHERE)


def _collector_toml(tmp_path: Path, agent_keys: str) -> Path:
    host_key = tmp_path / "host_key"
    host_key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    host_key.chmod(0o600)  # a private key others may read stops start-up
    agent_key = tmp_path / "agent.pub"
    agent_key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_public_key())
    path = tmp_path / "collector.toml"
    path.write_text(textwrap.dedent(f"""
        [server]
        host_key = "{host_key}"
        [storage]
        root = "{tmp_path / 'store'}"
        [[agents]]
        name = "db1"
        public_key = "{agent_key}"
        databases = ["hospital", "audit", "orders"]
    """) + textwrap.dedent(agent_keys))
    return path


def test_collector_toml_carries_expectations_per_database(tmp_path: Path) -> None:
    config = load_collector_config(_collector_toml(tmp_path, """
        expected_interval = "1d"
        shrink_factor = 0.3
        [agents.expected_intervals]
        audit = "1w"
        orders = "1h"
    """))
    (agent,) = config.agents
    assert agent.expectations.for_database("hospital") == Expectation(86400.0, 0.3)
    assert agent.expectations.for_database("audit").interval_s == 7 * 86400
    assert agent.expectations.for_database("orders").interval_s == 3600


def test_collector_toml_without_expectations_keeps_the_defaults(tmp_path: Path) -> None:
    (agent,) = load_collector_config(_collector_toml(tmp_path, "")).agents
    assert agent.expectations == AgentExpectations()


def test_collector_toml_names_the_file_and_key_of_a_bad_interval(tmp_path: Path) -> None:
    path = _collector_toml(tmp_path, 'expected_interval = "daily"\n')
    with pytest.raises(ConfigError, match=rf"{path}: agents\[0\]\.expected_interval"):
        load_collector_config(path)
