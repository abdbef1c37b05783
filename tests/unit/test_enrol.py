"""`enrol-agent` and the agents.d drop-ins beside collector.toml, their reload on SIGHUP;
the collector's own key checks; and the metrics of an agent enrolled without a list."""

from __future__ import annotations

import textwrap
from pathlib import Path

import asyncssh
import pytest
from prometheus_client import CollectorRegistry

from collector.config import load_collector_config
from collector.enrol import enrol_agent, parse_databases
from collector.report.metrics import OPEN_AGENT_DATABASES, OTHER, CollectorMetrics
from collector.report.outcomes import FanOut
from collector.serve.reload import reload_agents
from collector.serve.server import CollectorServer, CollectorSSHServer, make_context
from common.errors import ConfigError

COLLECTOR = """
[server]
listen = "127.0.0.1:2222"
host_key = "host_key"

[storage]
root = "store"
"""


def keypair(path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(f"{path}.pub")
    return Path(f"{path}.pub")


@pytest.fixture
def collector_toml(tmp_path: Path) -> Path:
    keypair(tmp_path / "host_key")
    path = tmp_path / "collector.toml"
    path.write_text(textwrap.dedent(COLLECTOR))
    return path


def test_an_enrolled_agent_is_read_with_the_configuration(collector_toml: Path) -> None:
    pub = keypair(collector_toml.parent / "db1_key")
    dropin = enrol_agent(collector_toml, "db1", pub, ("hospital", "pharmacy"))
    assert dropin == collector_toml.parent / "agents.d" / "db1.toml"
    assert oct(dropin.stat().st_mode & 0o777) == "0o640"
    agent = load_collector_config(collector_toml).agent("db1")
    assert agent is not None
    assert agent.databases == ("hospital", "pharmacy")
    assert agent.public_key == collector_toml.parent / "agents.d" / "db1.pub"
    assert agent.public_key.read_text().split()[:2] == pub.read_text().split()[:2]


def test_an_agent_enrolled_without_databases_accepts_every_database(
    collector_toml: Path,
) -> None:
    enrol_agent(collector_toml, "db1", keypair(collector_toml.parent / "k"), None)
    agent = load_collector_config(collector_toml).agent("db1")
    assert agent is not None and agent.databases is None


def test_enrolled_agents_sit_next_to_agents_tables(collector_toml: Path) -> None:
    pub = keypair(collector_toml.parent / "old")
    collector_toml.write_text(collector_toml.read_text()
                              + f'\n[[agents]]\nname = "old"\npublic_key = "{pub}"\n')
    enrol_agent(collector_toml, "new", keypair(collector_toml.parent / "new"), None)
    assert [a.name for a in load_collector_config(collector_toml).agents] == ["old", "new"]


def test_enrolling_a_name_twice_is_refused_unless_replacing(collector_toml: Path) -> None:
    first = keypair(collector_toml.parent / "a")
    second = keypair(collector_toml.parent / "b")
    enrol_agent(collector_toml, "db1", first, None)
    with pytest.raises(ConfigError, match=r"already configured .*--replace"):
        enrol_agent(collector_toml, "db1", second, None)
    enrol_agent(collector_toml, "db1", second, ("x",), replace=True)
    agent = load_collector_config(collector_toml).agent("db1")
    assert agent is not None and agent.databases == ("x",)
    assert agent.public_key is not None
    assert agent.public_key.read_text().split()[1] == second.read_text().split()[1]


def test_enrolling_a_name_of_an_agents_table_is_refused(collector_toml: Path) -> None:
    pub = keypair(collector_toml.parent / "old")
    collector_toml.write_text(collector_toml.read_text()
                              + f'\n[[agents]]\nname = "db1"\npublic_key = "{pub}"\n')
    with pytest.raises(ConfigError, match=f"already configured in {collector_toml}$"):
        enrol_agent(collector_toml, "db1", pub, None, replace=True)


@pytest.mark.parametrize("name", ["../x", ".hidden", "-opt", "a b", ""])
def test_a_bad_agent_name_is_refused_before_anything_is_written(
    collector_toml: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match="agent name"):
        enrol_agent(collector_toml, name, keypair(collector_toml.parent / "k"), None)
    assert not (collector_toml.parent / "agents.d").exists()


def test_a_file_that_is_not_a_public_key_is_refused(collector_toml: Path) -> None:
    junk = collector_toml.parent / "junk.pub"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a readable SSH public key"):
        enrol_agent(collector_toml, "db1", junk, None)


def test_databases_option_is_a_comma_list() -> None:
    assert parse_databases(None) is None
    assert parse_databases("a, b") == ("a", "b")
    with pytest.raises(ConfigError, match="--databases"):
        parse_databases("a,,b")


def test_a_broken_dropin_stops_the_collector_naming_the_file(collector_toml: Path) -> None:
    folder = collector_toml.parent / "agents.d"
    folder.mkdir()
    (folder / "db1.toml").write_text('name = "db1"\npublic_kye = "x"\n')
    with pytest.raises(ConfigError, match=r"agents\.d/db1\.toml: public_key is required"):
        load_collector_config(collector_toml)


def test_a_host_key_others_may_read_stops_the_collector(collector_toml: Path) -> None:
    (collector_toml.parent / "host_key").chmod(0o644)
    with pytest.raises(ConfigError, match=r"server\.host_key: private key .* readable by "
                                          r"everyone \(mode 0644\)"):
        load_collector_config(collector_toml)


def test_a_missing_agent_key_is_named(collector_toml: Path) -> None:
    collector_toml.write_text(collector_toml.read_text()
                              + '\n[[agents]]\nname = "db1"\npublic_key = "nope.pub"\n')
    with pytest.raises(ConfigError, match=r"agents\[0\]\.public_key: cannot read .*nope\.pub"):
        load_collector_config(collector_toml)


def series(registry: CollectorRegistry, agent: str) -> set[str]:
    return {s.labels["database"] for family in registry.collect() for s in family.samples
            if s.name == "backhaul_backups_total" and s.labels.get("agent") == agent}


def test_an_agent_without_a_list_gets_a_series_per_database_up_to_the_cap(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, {"db1": None}, tmp_path)
    for index in range(OPEN_AGENT_DATABASES + 5):
        metrics.backup_finished("db1", f"d{index}", f"id{index}", "success", None, 1, 1.0)
    names = series(registry, "db1")
    assert len(names) == OPEN_AGENT_DATABASES + 1
    assert OTHER in names and "d0" in names and f"d{OPEN_AGENT_DATABASES}" not in names


def test_a_reload_adds_agents_and_keeps_what_others_recorded(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = CollectorMetrics(registry, {"db1": ["a"]}, tmp_path)
    metrics.backup_finished("db1", "a", "id", "success", None, 1, 1.0)
    metrics.backup_finished("db2", "b", "id2", "success", None, 1, 1.0)
    assert series(registry, OTHER) == {OTHER}
    metrics.expect({"db1": ["a"], "db2": None})
    stamp = {"agent": "db1", "database": "a"}
    assert registry.get_sample_value("backhaul_backup_last_success_timestamp_seconds",
                                     stamp) != 0
    assert registry.get_sample_value("backhaul_agent_last_seen_timestamp_seconds",
                                     {"agent": "db2"}) == 0
    metrics.backup_finished("db2", "b", "id3", "success", None, 1, 1.0)
    assert series(registry, "db2") == {"b"}


def test_a_reload_admits_enrolled_agents_to_new_connections_only(collector_toml: Path) -> None:
    """SIGHUP's work: new connections get the new agents; a connection accepted before
    keeps the policy it was made with, so its uploads run on."""
    config = load_collector_config(collector_toml)
    server = CollectorServer(config, make_context(config, FanOut()))
    before = CollectorSSHServer(server.ctx, server.auth, server.caps, server.agents)
    pub = keypair(collector_toml.parent / "db1_key")
    enrol_agent(collector_toml, "db1", pub, ("hospital",))
    reload_agents(server, [])
    key = asyncssh.read_public_key(str(pub))
    assert server.agents == {"db1"}
    assert server.auth.validate_public_key("db1", key)
    assert server.ctx.allowed == {"db1": ("hospital",)}
    assert not before.validate_public_key("db1", key)  # made before the reload


def test_a_reload_of_a_broken_configuration_keeps_the_agents_in_use(
    collector_toml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enrol_agent(collector_toml, "db1", keypair(collector_toml.parent / "k"), None)
    config = load_collector_config(collector_toml)
    server = CollectorServer(config, make_context(config, FanOut()))
    (collector_toml.parent / "agents.d" / "db1.toml").write_text('name = "db1"\nbad = 1\n')
    reload_agents(server, [])
    assert server.agents == {"db1"}
    assert "reload refused, the agents in use stay" in caplog.text
