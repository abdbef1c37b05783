"""First-contact mistakes in a new install, each refused with its fix named: secrets
others may read, pinned keys that are not there, misspelt keys and tables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import load_agent_config
from agent.first_contact import check_agent_files
from common.config import Table
from common.credentials import check_secret_file
from common.errors import ConfigError
from tests.unit.agent_toml import write_agent_toml


def secret(path: Path, mode: int) -> Path:
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    """An agent.toml whose files are all present and private."""
    secret(tmp_path / "agent_key", 0o600)
    secret(tmp_path / "mysql.pass", 0o600)
    (tmp_path / "collector.pub").write_text("ssh-ed25519 AAAA collector\n")
    return write_agent_toml(tmp_path, source='password_file = "mysql.pass"')


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_secret_only_its_owner_reads_is_accepted(tmp_path: Path, mode: int) -> None:
    check_secret_file(secret(tmp_path / "key", mode), "private key", "here")


def not_roots(path: Path) -> Path:
    """A file owned by an account other than root (as made by a user, or by root for one)."""
    if os.geteuid() == 0:
        os.chown(path, 1, 1)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640, 0o660, 0o606])
def test_a_secret_others_or_its_group_may_read_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    """As OpenSSH: an account's own key must be 0600; "others" may never read a secret."""
    path = not_roots(secret(tmp_path / "key", mode))
    with pytest.raises(ConfigError, match=rf"here: private key {path} is (readable|open) .*"
                                          rf"mode {mode:04o}.*Fix: chmod 600 {path}"):
        check_secret_file(path, "private key", "here")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to root needs root")
def test_a_secret_of_root_readable_by_the_service_group_is_accepted(tmp_path: Path) -> None:
    """The tmpfiles layout: owner root, group the service's, 0640."""
    path = secret(tmp_path / "key", 0o640)
    os.chown(path, 0, 1)
    check_secret_file(path, "private key", "here")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        check_secret_file(path, "private key", "here")


def test_a_missing_secret_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"here: password file .*nope does not exist"):
        check_secret_file(tmp_path / "nope", "password file", "here")


def test_agent_files_in_order_pass(agent_toml: Path) -> None:
    check_agent_files(load_agent_config(agent_toml))


def test_a_password_file_at_0644_stops_the_agent(agent_toml: Path) -> None:
    (agent_toml.parent / "mysql.pass").chmod(0o644)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.password_file: password file .* "
                                          r"readable by everyone \(mode 0644\)"):
        check_agent_files(load_agent_config(agent_toml))


def test_a_group_readable_agent_key_stops_the_agent(agent_toml: Path) -> None:
    not_roots(agent_toml.parent / "agent_key").chmod(0o640)
    with pytest.raises(ConfigError, match=r"collector\.client_key: private key .* its group"):
        check_agent_files(load_agent_config(agent_toml))


def test_a_missing_agent_key_stops_the_agent(agent_toml: Path) -> None:
    (agent_toml.parent / "agent_key").unlink()
    with pytest.raises(ConfigError, match=r"collector\.client_key: private key .* does not exist"):
        check_agent_files(load_agent_config(agent_toml))


def test_a_missing_pinned_collector_key_is_named_with_where_to_get_it(agent_toml: Path) -> None:
    (agent_toml.parent / "collector.pub").unlink()
    with pytest.raises(ConfigError, match=r"collector\.host_key: .*collector\.pub does not "
                                          r"exist; copy the collector's public host key"):
        check_agent_files(load_agent_config(agent_toml))


def test_source_in_the_singular_is_named_with_the_right_table(agent_toml: Path) -> None:
    """`[[source]]` is refused as a misspelling of `[[sources]]`, not as "no sources"."""
    agent_toml.write_text(agent_toml.read_text().replace("[[sources]]", "[[source]]"))
    with pytest.raises(ConfigError, match=r"source: unknown key; did you mean 'sources'\?"):
        load_agent_config(agent_toml)


def test_an_unknown_key_close_to_a_known_one_gets_a_suggestion(tmp_path: Path) -> None:
    table = Table({"pasword_file": "x", "user": "u"}, tmp_path / "a.toml", "sources[0].")
    table.text("user")
    table.path("password_file", None)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.pasword_file: unknown key; "
                                          r"did you mean 'password_file'\?"):
        table.done()


def test_an_unknown_key_far_from_any_known_one_gets_no_suggestion(tmp_path: Path) -> None:
    table = Table({"colour": "blue", "user": "u"}, tmp_path / "a.toml")
    table.text("user")
    with pytest.raises(ConfigError, match=r"colour: unknown key$"):
        table.done()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_secret_this_user_cannot_read_is_named(tmp_path: Path) -> None:
    path = secret(tmp_path / "key", 0o000)
    with pytest.raises(ConfigError, match=r"cannot read private key .*Permission denied"):
        check_secret_file(path, "private key", "here")
