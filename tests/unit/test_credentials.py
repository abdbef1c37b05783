"""Password files under one rule (nothing for others, group only on root's files, one line),
and scrubbing passwords from text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.credentials import read_secret_file, scrub
from common.errors import ConfigError

WHERE = "source db1"


def secret_file(folder: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path = folder / "password"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        read_secret_file(path, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ")
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("s3cret\n", "s3cret"),
        ("s3cret", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("  spaced pass  \n", "  spaced pass  "),
        ("p\u00e4ss\n", "p\u00e4ss"),
    ],
)
def test_one_line_with_or_without_a_line_ending_is_the_password(
    tmp_path: Path, content: str, expected: str
) -> None:
    assert read_secret_file(secret_file(tmp_path, content), WHERE) == expected


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    assert read_secret_file(secret_file(tmp_path, "s3cret\n", mode), WHERE) == "s3cret"


def test_a_world_readable_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "s3cret\n", 0o644)
    message = refusal(path)
    assert "readable by everyone" in message
    assert f"chmod 600 {path}" in message


@pytest.mark.parametrize(
    ("mode", "why"),
    [(0o640, "readable by its group"), (0o604, "readable by everyone"), (0o620, "group")],
)
def test_any_access_for_group_or_others_is_refused(tmp_path: Path, mode: int, why: str) -> None:
    """Group access is refused on a file of any account but root (see the next test)."""
    path = secret_file(tmp_path, "s3cret\n", mode)
    if os.geteuid() == 0:
        os.chown(path, 1, 1)
    message = refusal(path)
    assert why in message
    assert f"mode {mode:04o}" in message and "chmod 600" in message


@pytest.mark.parametrize("content", ["first\nsecond\n", "first\nsecond", "one\r\ntwo\r\n", "a\rb"])
def test_two_lines_are_refused(tmp_path: Path, content: str) -> None:
    """A second line is a mistake (a pasted note, two passwords), not something to ignore."""
    message = refusal(secret_file(tmp_path, content))
    assert "exactly one line" in message
    assert "first" not in message and "second" not in message


@pytest.mark.parametrize("content", ["", "\n", "\r\n", "\n\nsecret-on-line-3\n"])
def test_an_empty_first_line_is_refused(tmp_path: Path, content: str) -> None:
    message = refusal(secret_file(tmp_path, content))
    assert "exactly one line" in message
    assert "secret-on-line-3" not in message


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    message = refusal(tmp_path / "absent")
    assert "cannot read password file" in message
    assert "No such file or directory" in message


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "not a regular file" in refusal(tmp_path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    assert "not UTF-8" in refusal(secret_file(tmp_path, b"\xff\xfesecret\n"))


def test_an_oversized_file_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    assert "too large" in refusal(secret_file(tmp_path, "x" * 100_000))


def test_scrub_masks_every_occurrence() -> None:
    assert scrub("auth failed for hunter22 (hunter22)", "hunter22") == "auth failed for *** (***)"


def test_scrub_masks_the_url_quoted_form() -> None:
    """A password inside a MongoDB URI appears percent-encoded in the driver's errors."""
    text = scrub("bad uri mongodb://u:p%40ss%2Fw@host", "p@ss/w")
    assert text == "bad uri mongodb://u:***@host"


def test_scrub_masks_a_short_password_too() -> None:
    assert "abc" not in scrub("xabcx", "abc")


def test_scrub_ignores_absent_passwords() -> None:
    assert scrub("nothing secret", None, "") == "nothing secret"


def test_scrub_masks_the_longer_of_two_overlapping_secrets_whole() -> None:
    assert scrub("key=longsecret", "long", "longsecret") == "key=***"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to root needs root")
def test_a_password_file_of_root_readable_by_the_service_group_is_read(tmp_path: Path) -> None:
    """The installed layout: owner root, group the service's, 0640; others still refused."""
    path = secret_file(tmp_path, "s3cret\n", 0o640)
    os.chown(path, 0, 1)
    assert read_secret_file(path, WHERE) == "s3cret"
    path.chmod(0o604)
    assert "readable by everyone" in refusal(path)
