"""Tests for backup names: the reversible file-name encoding of hostile database names,
the refusal of impossible names, and reading stored names back."""

from __future__ import annotations

import contextlib
import re
from datetime import date

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.errors import RejectCode, RemoteProtocolError
from common.naming import (
    EXTENSIONS,
    MANIFEST_SUFFIX,
    MAX_DB_NAME_CHARS,
    ParsedName,
    backup_name,
    check_database_name,
    decode_database,
    encode_database,
    extension_for,
    parse_backup_name,
)

DAY = date(2026, 11, 26)
HOSTILE_NAMES = [
    "hospital",
    "a/b",
    "..",
    ".",
    ".hidden",
    "sp ace",
    " leading space",
    "\u00fcn\u00ef",
    "-leading",
    "-",
    "%",
    "%41",
    "_20261126",
    "x_20260101-2",
    "x_20260101",
    "h\u043espital",  # Cyrillic small letter o
    "hospital.sql.zst",
    "a\\b",
    "\u6570\u636e\u5e93",  # CJK
    "q" * MAX_DB_NAME_CHARS,
    "Ab9_-" * 12 + "z-_9",
    "\u00e9" * 30,
]
ENCODED_CHARS = re.compile(r"\A[A-Za-z0-9_%-]+\Z")


# --- the encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_name_is_accepted_and_round_trips(name: str) -> None:
    check_database_name(name)
    assert decode_database(encode_database(name)) == name


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_encoded_name_cannot_leave_hide_or_pose_as_an_option(name: str) -> None:
    encoded = encode_database(name)
    assert "/" not in encoded
    assert "." not in encoded
    assert not encoded.startswith(("-", "."))
    assert ENCODED_CHARS.match(encoded)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("hospital", "hospital"),
        ("a/b", "a%2Fb"),
        ("..", "%2E%2E"),
        (".hidden", "%2Ehidden"),
        ("sp ace", "sp%20ace"),
        ("\u00fcn\u00ef", "%C3%BCn%C3%AF"),
        ("-leading", "%2Dleading"),
        ("mid-dash", "mid-dash"),
        ("%", "%25"),
        ("_20261126", "_20261126"),
    ],
)
def test_encoding_keeps_safe_ascii_and_escapes_every_other_byte(name: str, encoded: str) -> None:
    assert encode_database(name) == encoded


def test_cyrillic_look_alike_stays_visibly_different_on_disk() -> None:
    look_alike = "h\u043espital"
    assert encode_database(look_alike) == "h%D0%BEspital"
    assert encode_database(look_alike) != encode_database("hospital")


@pytest.mark.parametrize(
    "encoded",
    ["%", "%4", "%4g", "%4a", "a.b", "a/b", "%C3", "%FF", "%2F%", "%41", "%5F", "sp ace"],
)
def test_decode_refuses_invalid_or_non_canonical_encodings(encoded: str) -> None:
    with pytest.raises(ValueError):
        decode_database(encoded)


# --- refused names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a\x00b",
        "\x00",
        "line\nbreak",
        "tab\there",
        "esc\x1b[31m",
        "del\x7f",
        "c1\x85",
        "x" * (MAX_DB_NAME_CHARS + 1),
        "trailing ",
        "trailing\u00a0",
        "trailing\u3000",
        "emoji\U0001f600",
        "astral\U00020000",
        "private\ue000",
        "surrogate\ud800",
        "unassigned\u0378",
        "\u4e2d" * 40,  # 64 characters or fewer, but over 200 bytes once encoded
    ],
)
def test_check_database_name_refuses_with_bad_name(name: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        check_database_name(name)
    assert caught.value.reject_code is RejectCode.BAD_NAME


def test_check_database_name_accepts_exactly_the_length_limit() -> None:
    check_database_name("n" * MAX_DB_NAME_CHARS)


# --- backup names ------------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(EXTENSIONS.values()))
@pytest.mark.parametrize("seq", [1, 2, 17, 9999])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_parse_reads_back_every_backup_name(name: str, seq: int, ext: str) -> None:
    stored = backup_name(name, DAY, seq, ext)
    assert parse_backup_name(stored) == ParsedName(name, DAY, seq, ext)


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        (1, "hospital_20261126.sql.zst"),
        (2, "hospital_20261126-2.sql.zst"),
        (17, "hospital_20261126-17.sql.zst"),
    ],
)
def test_backup_name_adds_a_suffix_from_the_second_backup_of_a_day(seq: int, expected: str) -> None:
    assert backup_name("hospital", DAY, seq, "sql.zst") == expected


def test_database_named_like_a_dated_backup_parses_back() -> None:
    stored = backup_name("x_20260101-2", DAY, 3, "sql.gz")
    assert stored == "x_20260101-2_20261126-3.sql.gz"
    assert parse_backup_name(stored) == ParsedName("x_20260101-2", DAY, 3, "sql.gz")


@pytest.mark.parametrize(
    "file_name",
    [
        "",
        "garbage",
        "hospital.sql.zst",
        "hospital_2026112.sql.zst",
        "hospital_202611260.sql.zst",
        "hospital_20261126.sql",
        "hospital_20261126.txt.zst",
        "hospital_20261126.sql.bz2",
        "hospital_20261126.SQL.ZST",
        "hospital_20261126-0.sql.zst",
        "hospital_20261126-02.sql.zst",
        "hospital_20261126-10000.sql.zst",
        "hospital_20261126-.sql.zst",
        "hospital_20261332.sql.zst",
        "hospital_20260229.sql.zst",
        "hospital_00001126.sql.zst",
        "hospital_20261126.sql.zst" + MANIFEST_SUFFIX,
        ".tmp-0123456789abcdef",
        ".hospital_20261126.sql.zst",
        "-x_20261126.sql.zst",
        "_20261126.sql.zst",
        "a%2f_20261126.sql.zst",
        "a%C3_20261126.sql.zst",
        "%41_20261126.sql.zst",
        "a b_20261126.sql.zst",
        "hospital_20261126.sql.zst\n",
        "hospital_\u0662\u0660\u0662\u0666\u0661\u0661\u0662\u0666.sql.zst",
        "dir/hospital_20261126.sql.zst",
    ],
)
def test_parse_returns_none_for_anything_that_is_not_a_backup_name(file_name: str) -> None:
    assert parse_backup_name(file_name) is None


@pytest.mark.parametrize(("key", "ext"), list(EXTENSIONS.items()))
def test_extension_for_known_format_and_compression(key: tuple[str, str], ext: str) -> None:
    assert extension_for(*key) == ext


@pytest.mark.parametrize(("fmt", "compression"), [("sql", "bz2"), ("csv", "zstd"), ("", "")])
def test_extension_for_unknown_combination_is_a_remote_error(fmt: str, compression: str) -> None:
    with pytest.raises(RemoteProtocolError, match="unsupported"):
        extension_for(fmt, compression)


# --- properties --------------------------------------------------------------------------

BMP_TEXT = st.text(
    st.characters(max_codepoint=0xFFFF, exclude_categories=("Cc", "Cs", "Co", "Cn")),
    min_size=1,
    max_size=MAX_DB_NAME_CHARS,
)
ANY_TEXT = st.text(max_size=80)
DAYS = st.dates(min_value=date(1000, 1, 1), max_value=date(9999, 12, 31))
SEQS = st.integers(min_value=1, max_value=9999)
EXTS = st.sampled_from(sorted(EXTENSIONS.values()))


def valid(name: str) -> bool:
    try:
        check_database_name(name)
    except RemoteProtocolError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(name=ANY_TEXT)
def test_check_database_name_raises_nothing_but_bad_name(name: str) -> None:
    try:
        check_database_name(name)
    except RemoteProtocolError as exc:
        assert exc.reject_code is RejectCode.BAD_NAME


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_parse_backup_name_never_raises(text: str) -> None:
    parsed = parse_backup_name(text)
    assert parsed is None or isinstance(parsed, ParsedName)


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_decode_database_raises_only_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        decode_database(text)


@settings(max_examples=500, deadline=None)
@given(name=BMP_TEXT, day=DAYS, seq=SEQS, ext=EXTS)
def test_every_valid_name_round_trips_through_a_backup_name(
    name: str, day: date, seq: int, ext: str
) -> None:
    assume(valid(name))
    encoded = encode_database(name)
    assert ENCODED_CHARS.match(encoded)
    assert not encoded.startswith(("-", "."))
    assert decode_database(encoded) == name
    assert parse_backup_name(backup_name(name, day, seq, ext)) == ParsedName(name, day, seq, ext)


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(st.sampled_from("ab_-%.0129 /"), min_size=1, max_size=24),
    day=DAYS,
    seq=SEQS,
    ext=EXTS,
)
def test_names_made_of_separator_characters_round_trip(
    name: str, day: date, seq: int, ext: str
) -> None:
    """Names built from `_`, `-`, digits and escapes cannot confuse the date or sequence."""
    assume(valid(name))
    assert parse_backup_name(backup_name(name, day, seq, ext)) == ParsedName(name, day, seq, ext)


@settings(max_examples=200, deadline=None)
@given(a=BMP_TEXT, b=BMP_TEXT)
def test_different_names_never_share_an_encoding(a: str, b: str) -> None:
    assume(a != b and valid(a) and valid(b))
    assert encode_database(a) != encode_database(b)
