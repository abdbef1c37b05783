"""Enrolling an agent with the README's three backhaul-certs commands, end to end: the
collector lists no key for the agent, only trusts the CA, and the backup lands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Deployment, mysql_source, run_agent, running_collector
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.sample_data import create_sample_databases

pytestmark = pytest.mark.integration


def certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certs.cli", *args],
                          capture_output=True, text=True, check=False)


async def test_agent_enrolled_by_certificate_backs_up_without_a_listed_key(
    mariadb: MariaDBServer, tmp_path: Path
) -> None:
    create_sample_databases(mariadb)
    ca, keys = tmp_path / "ca", tmp_path / "agent-keys"
    assert certs("init-ca", "--dir", str(ca)).returncode == 0
    # The README's three commands.
    assert certs("agent-key", "--name", "db7", "--dir", str(keys)).returncode == 0
    issued = certs("issue-agent", "--ca", str(ca), "--name", "db7",
                   "--pubkey", str(keys / "db7.pub"), "--validity", "+1w")
    assert issued.returncode == 0, issued.stderr
    shown = certs("show", str(keys / "db7-cert.pub"))
    assert shown.returncode == 0 and "db7" in shown.stdout

    deployment = Deployment(tmp_path)
    deployment.agents["db7"] = keys / "db7"
    collector = deployment.collector_toml(server_extra=f'ca_public_key = "{ca}/ca_key.pub"')
    # No [[agents]] public_key for db7: only its name, trusted through the CA.
    collector.write_text(collector.read_text().replace(
        f'public_key = "{keys / "db7"}.pub"\n', ""))
    assert "public_key" not in collector.read_text().split("[[agents]]")[1]
    password = tmp_path / "mysql.pass"
    password.write_text(mariadb.root_password + "\n")
    password.chmod(0o600)
    async with running_collector(collector) as (_, port):
        config = deployment.agent_toml("db7", port, mysql_source(
            mariadb.port, '["tricky"]', password_file=password))
        run = await run_agent(config)
    assert run.returncode == 0, run.stderr
    assert list((deployment.store / "db7" / "tricky").glob("tricky_*.sql.zst"))
    logs = "".join(p.read_text() for p in deployment.collector_logs.glob("*.log"))
    assert "by certificate" in logs
