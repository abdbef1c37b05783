"""Tests for the `[[offsite]]` tables (collector.offsite.config) and the recipients file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from collector.offsite.age_stream import fingerprint, read_recipients
from collector.offsite.config import OffsiteTarget, parse_offsite, parse_rate
from common.config import Table
from common.errors import ConfigError

RECIPIENT = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"
SECOND = "age1lggyhqrw2nlhcxprm67z43rta597azn8gknawjehu9d9dl0jq3yqqvfafg"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    secret = tmp_path / "b2.secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o600)
    (tmp_path / "recipients.txt").write_text(f"# admins\n{RECIPIENT}\n\n{SECOND}\n")
    return tmp_path


def parse(folder: Path, body: str) -> tuple[OffsiteTarget, ...]:
    text = f"""
[[offsite]]
name = "b2"
endpoint = "https://s3.eu-central-003.backblazeb2.com"
region = "eu-central-003"
bucket = "hospital-backups"
access_key_id = "0031234567890000000000001"
secret_access_key_file = "b2.secret"
recipients_file = "recipients.txt"
{body}
"""
    top = Table(tomllib.loads(text), folder / "collector.toml")
    return parse_offsite(top.tables("offsite"))


def test_the_issue_example_parses_with_lock_and_relative_files(files: Path) -> None:
    (target,) = parse(files, 'prefix = "backhaul/"\nlock_mode = "compliance"\nlock_days = 35')
    assert target.lock_mode == "compliance" and target.lock_days == 35
    assert target.prefix == "backhaul/"
    assert target.secret_access_key_file == files / "b2.secret"
    assert target.secret_access_key() == "s3cr3t"


def test_secret_is_not_in_the_targets_repr(files: Path) -> None:
    (target,) = parse(files, "")
    assert "s3cr3t" not in repr(target)


def test_unknown_key_is_refused_with_its_name(files: Path) -> None:
    with pytest.raises(ConfigError, match=r"offsite\[0\]\.secret_access_key: unknown key"):
        parse(files, 'secret_access_key = "inline"')


def test_lock_mode_without_days_is_refused(files: Path) -> None:
    with pytest.raises(ConfigError, match="lock_days must be at least 1"):
        parse(files, 'lock_mode = "governance"')


def test_unknown_lock_mode_is_refused(files: Path) -> None:
    with pytest.raises(ConfigError, match="lock_mode must be one of"):
        parse(files, 'lock_mode = "forever"\nlock_days = 3')


def test_secret_file_open_to_others_is_refused(files: Path) -> None:
    (files / "b2.secret").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        parse(files, "")


def test_private_key_in_recipients_file_is_refused(files: Path) -> None:
    (files / "recipients.txt").write_text("AGE-SECRET-KEY-1QQQ\n")
    with pytest.raises(ConfigError, match="private key"):
        parse(files, "")


def test_recipients_file_without_keys_is_refused(files: Path) -> None:
    (files / "recipients.txt").write_text("# nobody\n")
    with pytest.raises(ConfigError, match="holds no age1"):
        parse(files, "")


def test_two_recipients_are_read_and_fingerprinted_apart(files: Path) -> None:
    recipients = read_recipients(files / "recipients.txt", "here")
    assert recipients == (RECIPIENT, SECOND)
    assert fingerprint(RECIPIENT) != fingerprint(SECOND)


def test_max_rate_understands_binary_and_decimal_units(files: Path) -> None:
    assert parse_rate("20MiB/s", "x") == 20 * 2**20
    assert parse_rate("500KB/s", "x") == 500_000
    (target,) = parse(files, 'max_rate = "1.5MiB/s"')
    assert target.max_rate == int(1.5 * 2**20)


@pytest.mark.parametrize("text", ["20MiB", "fast", "0MiB/s", "-1MB/s"])
def test_max_rate_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a rate"):
        parse_rate(text, "max_rate")


def minimal(files: Path, name: str, endpoint: str) -> str:
    return f"""
[[offsite]]
name = "{name}"
endpoint = "{endpoint}"
bucket = "b"
access_key_id = "a"
secret_access_key_file = "{files / 'b2.secret'}"
recipients_file = "{files / 'recipients.txt'}"
"""


def test_endpoint_must_be_a_url(files: Path) -> None:
    text = minimal(files, "x", "s3.example.org")
    with pytest.raises(ConfigError, match="must start with https://"):
        parse_offsite(Table(tomllib.loads(text), files / "c.toml").tables("offsite"))


def test_two_targets_with_one_name_are_refused(files: Path) -> None:
    one = minimal(files, "same", "https://a")
    with pytest.raises(ConfigError, match="appears twice"):
        parse_offsite(Table(tomllib.loads(one + one), files / "c.toml").tables("offsite"))


def test_max_rate_holds_uploads_back_to_the_rate(files: Path) -> None:
    """After 1 MiB "sent" at 4 MiB/s, the throttle waits out the rest of 0.25 s."""
    import time

    from collector.offsite.bucket import Bucket

    (target,) = parse(files, 'max_rate = "4MiB/s"')
    bucket = Bucket(target)  # builds a client; no request is made
    started = time.monotonic()
    bucket._throttle(2**20, started)
    assert 0.2 <= time.monotonic() - started < 1.0
