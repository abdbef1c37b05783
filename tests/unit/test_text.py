"""The one rule for showing untrusted text (escape_control) and byte counts (human_bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.text import escape_control, human_bytes


def unescape(shown: str) -> str:
    """Read escape_control's output back the way Python reads a string literal."""
    return shown.encode("latin-1", "backslashreplace").decode("unicode_escape")


@pytest.mark.parametrize(
    "text", ["plain text", "ünï sp ace", "\u6570\u636e", "emoji \U0001f600", "", "a/b..c"]
)
def test_escape_control_leaves_visible_text_alone(text: str) -> None:
    assert escape_control(text) == text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("line\nforged", "line\\nforged"),
        ("a\r\nSubject: x", "a\\r\\nSubject: x"),  # no forged e-mail header
        ("cr\rhere", "cr\\rhere"),
        ("tab\there", "tab\\there"),
        ("nul\x00", "nul\\x00"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("bell\x07", "bell\\x07"),
    ],
)
def test_escape_control_shows_c0_controls(text: str, shown: str) -> None:
    assert escape_control(text) == shown


def test_escape_control_shows_del() -> None:
    assert escape_control("del\x7f") == "del\\x7f"


@pytest.mark.parametrize(("text", "shown"), [("nel\x85", "nel\\x85"), ("csi\x9b2J", "csi\\x9b2J")])
def test_escape_control_shows_c1_controls(text: str, shown: str) -> None:
    assert escape_control(text) == shown


def test_escape_control_doubles_a_backslash() -> None:
    """A name holding a backslash and an "n" must not read as a name holding a newline."""
    assert escape_control("back\\slash") == "back\\\\slash"
    assert escape_control("a\\nb") != escape_control("a\nb")


@pytest.mark.parametrize(("text", "shown"), [("\u2028", "\\u2028"), ("\u2029", "\\u2029")])
def test_escape_control_shows_line_and_paragraph_separators(text: str, shown: str) -> None:
    assert escape_control(f"a{text}b") == f"a{shown}b"


@pytest.mark.parametrize("char", ["\u202e", "\u202d", "\u2066", "\u2067", "\u2069", "\u200f"])
def test_escape_control_shows_bidi_controls(char: str) -> None:
    assert escape_control(f"x{char}y") == f"x\\u{ord(char):04x}y"


@pytest.mark.parametrize(
    ("char", "shown"),
    [
        ("\u00a0", "\\xa0"),  # NBSP
        ("\u202f", "\\u202f"),  # narrow NBSP
        ("\u2007", "\\u2007"),  # figure space
        ("\u3000", "\\u3000"),  # ideographic space
        ("\u200b", "\\u200b"),  # zero-width space
        ("\u200d", "\\u200d"),  # zero-width joiner
        ("\ufeff", "\\ufeff"),  # zero-width no-break space (BOM)
        ("\u00ad", "\\xad"),  # soft hyphen
        ("\u2060", "\\u2060"),  # word joiner
        ("\u3164", "\\u3164"),  # Hangul filler, a letter that draws nothing
        ("\u115f", "\\u115f"),  # Hangul choseong filler
        ("\ufe0f", "\\ufe0f"),  # variation selector
        ("\U000e0041", "\\U000e0041"),  # tag character
    ],
)
def test_escape_control_shows_nbsp_and_invisible_characters(char: str, shown: str) -> None:
    assert escape_control(f"a{char}b") == f"a{shown}b"


@pytest.mark.parametrize(
    ("char", "shown"),
    [("\ue000", "\\ue000"), ("\uf8ff", "\\uf8ff"), ("\U000f0000", "\\U000f0000")],
)
def test_escape_control_shows_private_use_characters(char: str, shown: str) -> None:
    assert escape_control(char) == shown


def test_escape_control_shows_a_lone_surrogate() -> None:
    assert escape_control("lone\ud800") == "lone\\ud800"


def test_escape_control_keeps_the_ascii_space() -> None:
    assert escape_control("sp ace") == "sp ace"


def test_escape_control_is_unambiguous_above_the_bmp() -> None:
    """U+E0001 must not read the same as U+E000 followed by "1"."""
    assert escape_control("\U000e0001") != escape_control("\ue0001")


def test_escape_control_without_backslash_keeps_earlier_escapes() -> None:
    """A last pass over composed text escapes the same characters but doubles nothing."""
    reason = escape_control("oops\nFAKE")
    composed = f"aborted: {reason}\x1b[2J"
    assert escape_control(composed, backslash=False) == "aborted: oops\\nFAKE\\x1b[2J"


@given(st.text())
def test_escaped_text_is_one_printable_line(text: str) -> None:
    shown = escape_control(text)
    assert shown.isprintable()
    assert len(shown.splitlines()) <= 1


@given(st.text())
def test_escaped_text_reads_back_as_the_original(text: str) -> None:
    """Unambiguous: every output stands for exactly one input."""
    assert unescape(escape_control(text)) == text


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**5, "5.0 PiB"),
        (33.4, "33 B"),
    ],
)
def test_human_bytes_uses_binary_units(count: float, shown: str) -> None:
    assert human_bytes(count) == shown
