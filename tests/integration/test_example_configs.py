"""The example configurations the README points at are valid as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import ssh_keygen

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _localised(name: str, tmp_path: Path) -> Path:
    """The example with its key paths pointed at real keys made by ssh-keygen."""
    key = ssh_keygen(tmp_path / "key")
    text = (EXAMPLES / name).read_text()
    for path in ("/etc/backhaul/collector/ssh_host_ed25519_key",
                 "/etc/backhaul/agent/agent_key"):
        text = text.replace(f'"{path}"', f'"{key}"')
    for path in ("/etc/backhaul/agents/db-vm-1.pub",
                 "/etc/backhaul/agent/collector_host_key.pub"):
        text = text.replace(f'"{path}"', f'"{key}.pub"')
    password = tmp_path / "mysql.pass"
    password.write_text("secret\n")
    password.chmod(0o600)
    text = text.replace('"/etc/backhaul/agent/mysql.pass"', f'"{password}"')
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("program,name", [("collector", "collector.toml"),
                                          ("agent", "agent.toml")])
def test_example_config_passes_check_config(program: str, name: str, tmp_path: Path) -> None:
    config = _localised(name, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", f"{program}.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_a_misspelt_key_is_refused_with_file_and_key_named(tmp_path: Path) -> None:
    config = _localised("collector.toml", tmp_path)
    config.write_text(config.read_text().replace("idle_timeout", "idle_timeuot"))
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert f"{config}: server.idle_timeuot: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
