"""The smallest agent.toml the config tests start from: one agent, db1, and one MySQL
source, main, with room for the keys a test is about."""

from __future__ import annotations

import textwrap
from pathlib import Path

BASE = """
[agent]
name = "db1"
{agent}

[collector]
address = "127.0.0.1:2222"
host_key = "collector.pub"
client_key = "agent_key"

[[sources]]
name = "main"
engine = "mysql"
user = "backup"
databases = ["hospital"]
{source}
"""


def write_agent_toml(tmp_path: Path, *, agent: str = "", source: str = "") -> Path:
    """``tmp_path/agent.toml`` with ``agent`` lines added to [agent] and ``source`` lines
    to the source."""
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(BASE).format(agent=agent, source=source))
    return path
