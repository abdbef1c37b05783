"""Tests for strict TOML reading (common.config) and safe log output (common.logsetup)."""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Table, load_toml, parse_host_port
from common.errors import ConfigError
from common.logsetup import DailyFileHandler, SafeFormatter
from common.text import escape_control

CONFIG = """
name = "web1"
log_dir = "logs"
key = "/etc/backhaul/agent_key"
retries = 3
timeout = 2.5
syslog = true
databases = ["hospital", "billing"]

[collector]
address = "backup.example.org:2222"
host_key = "keys/collector.pub"

[[sources]]
name = "db1"
port = 3306

[[sources]]
name = "db2"
port = true
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text(CONFIG)
    return path


@pytest.fixture
def top(config_path: Path) -> Table:
    return Table(load_toml(config_path), config_path)


# --- load_toml ---------------------------------------------------------------------------


def test_load_toml_reads_a_file(config_path: Path) -> None:
    assert load_toml(config_path)["name"] == "web1"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "absent.toml")


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_toml(tmp_path)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="invalid TOML") as caught:
        load_toml(path)
    assert str(path) in str(caught.value)


# --- Table -------------------------------------------------------------------------------


def test_typed_reads_return_the_values(top: Table) -> None:
    assert top.text("name") == "web1"
    assert top.integer("retries") == 3
    assert top.number("timeout") == 2.5
    assert top.flag("syslog") is True
    assert top.str_list("databases") == ("hospital", "billing")


def test_number_accepts_an_integer_as_a_float(top: Table) -> None:
    value = top.number("retries")
    assert value == 3.0
    assert isinstance(value, float)


def test_defaults_apply_to_missing_keys(top: Table) -> None:
    assert top.text("absent", "fallback") == "fallback"
    assert top.integer("absent", None) is None
    assert top.number("absent", None) is None
    assert top.path("absent", None) is None
    assert top.flag("absent", False) is False


def test_unknown_key_is_named_with_file_and_key(top: Table, config_path: Path) -> None:
    top.text("name")
    with pytest.raises(ConfigError, match="unknown key") as caught:
        top.done()
    assert str(caught.value) == f"{config_path}: collector: unknown key"


def test_unknown_key_in_a_nested_table_has_a_dotted_path(top: Table, config_path: Path) -> None:
    collector = top.table("collector")
    collector.text("address")
    with pytest.raises(ConfigError) as caught:
        collector.done()
    assert str(caught.value) == f"{config_path}: collector.host_key: unknown key"


def test_unknown_key_in_an_array_of_tables_names_the_index(top: Table, config_path: Path) -> None:
    sources = top.tables("sources")
    assert [s.text("name") for s in sources] == ["db1", "db2"]
    with pytest.raises(ConfigError) as caught:
        sources[1].done()
    assert str(caught.value) == f"{config_path}: sources[1].port: unknown key"


def test_done_passes_when_every_key_was_read(config_path: Path) -> None:
    table = Table({"a": 1, "b": {"c": "x"}}, config_path)
    table.integer("a")
    inner = table.table("b")
    inner.text("c")
    inner.done()
    table.done()


def test_missing_required_key_is_named(top: Table, config_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        top.table("collector").text("client_key")
    assert str(caught.value) == f"{config_path}: collector.client_key is required"


def test_missing_required_table_is_named(top: Table) -> None:
    with pytest.raises(ConfigError, match="server is required"):
        top.table("server", required=True)


def test_missing_optional_table_reads_as_empty(top: Table) -> None:
    server = top.table("server")
    assert server.text("listen", "0.0.0.0:2222") == "0.0.0.0:2222"
    server.done()


def test_boolean_where_an_integer_is_expected_is_refused(top: Table) -> None:
    sources = top.tables("sources")
    assert sources[0].integer("port") == 3306
    with pytest.raises(ConfigError, match=r"sources\[1\]\.port must be an integer, not a boolean"):
        sources[1].integer("port")


@pytest.mark.parametrize(
    ("reader", "key", "expected"),
    [
        ("integer", "name", "an integer"),
        ("integer", "timeout", "an integer"),
        ("number", "syslog", "a number, not a boolean"),
        ("number", "name", "a number"),
        ("text", "retries", "a string"),
        ("text", "syslog", "a string, not a boolean"),
        ("flag", "retries", "true or false"),
        ("flag", "name", "true or false"),
        ("path", "retries", "a path"),
        ("str_list", "name", "a list of strings"),
        ("table", "name", "a table"),
        ("tables", "collector", "an array of tables"),
    ],
)
def test_wrong_type_is_refused_with_the_key_named(
    top: Table, config_path: Path, reader: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        getattr(top, reader)(key)
    message = str(caught.value)
    assert message.startswith(f"{config_path}: {key} must be {expected}")


def test_list_with_a_non_string_is_refused(config_path: Path) -> None:
    table = Table({"databases": ["a", 1]}, config_path)
    with pytest.raises(ConfigError, match="a list of strings"):
        table.str_list("databases")


def test_array_item_that_is_not_a_table_is_refused(config_path: Path) -> None:
    table = Table({"sources": [{"name": "a"}, "b"]}, config_path)
    with pytest.raises(ConfigError, match=r"sources\[1\] must be a table"):
        table.tables("sources")


@pytest.mark.parametrize(("value", "ok"), [(0, True), (65535, True), (-1, False), (65536, False)])
def test_integer_range_is_enforced(config_path: Path, value: int, ok: bool) -> None:
    table = Table({"port": value}, config_path)
    if ok:
        assert table.integer("port", low=0, high=65535) == value
    else:
        with pytest.raises(ConfigError, match="between 0 and 65535"):
            table.integer("port", low=0, high=65535)


def test_number_minimum_is_enforced(config_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        Table({"timeout": 0.5}, config_path).number("timeout", low=1)


def test_number_maximum_is_enforced(config_path: Path) -> None:
    with pytest.raises(ConfigError, match="at most 300"):
        Table({"timeout": 301}, config_path).number("timeout", high=300)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_number_refuses_nan_and_infinity(config_path: Path, value: float) -> None:
    """TOML has nan and inf; a NaN timeout would pass every comparison and mean nothing."""
    with pytest.raises(ConfigError, match="finite number"):
        Table({"timeout": value}, config_path).number("timeout", low=1)


def test_text_choices_are_enforced(config_path: Path) -> None:
    table = Table({"compression": "bz2"}, config_path)
    with pytest.raises(ConfigError, match="one of zstd, gzip"):
        table.text("compression", choices=("zstd", "gzip"))
    assert Table({}, config_path).text("compression", "zstd", choices=("zstd",)) == "zstd"


def test_relative_path_is_resolved_against_the_config_folder(top: Table, config_path: Path) -> None:
    assert top.path("log_dir") == config_path.parent / "logs"
    assert top.table("collector").path("host_key") == config_path.parent / "keys/collector.pub"


def test_absolute_path_is_kept(top: Table) -> None:
    assert top.path("key") == Path("/etc/backhaul/agent_key")


def test_empty_path_is_refused(config_path: Path) -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        Table({"log_dir": ""}, config_path).path("log_dir")


def test_raw_returns_the_value_as_given(config_path: Path) -> None:
    table = Table({"databases": "all", "retention": {"keep_daily": 7}}, config_path)
    assert table.raw("databases") == "all"
    assert table.raw("retention") == {"keep_daily": 7}
    assert table.raw("absent", None) is None


def test_raw_returns_a_boolean_as_given(config_path: Path) -> None:
    """The agent reads `oplog = true` and `include_users_and_roles = true` through raw()."""
    assert Table({"oplog": True}, config_path).raw("oplog") is True


def test_has_reports_presence_without_taking_the_key(config_path: Path) -> None:
    table = Table({"a": 1}, config_path)
    assert table.has("a")
    assert not table.has("b")
    with pytest.raises(ConfigError, match="a: unknown key"):
        table.done()


# --- parse_host_port ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        ("host:1", None, ("host", 1)),
        ("backup.example.org:2222", None, ("backup.example.org", 2222)),
        ("10.0.0.1:0", None, ("10.0.0.1", 0)),
        ("host:65535", None, ("host", 65535)),
        ("[::1]:22", None, ("::1", 22)),
        ("[fe80::1%eth0]:2222", None, ("fe80::1%eth0", 2222)),
        ("host", 2222, ("host", 2222)),
        ("host:22", 2222, ("host", 22)),
    ],
)
def test_parse_host_port_accepts(
    value: str, default: int | None, expected: tuple[str, int]
) -> None:
    assert parse_host_port(value, "collector.address", default) == expected


@pytest.mark.parametrize(
    "value",
    [
        "host",
        "host:",
        ":22",
        "[]:22",
        "host:65536",
        "host:-1",
        "host:+1",
        "host:2x",
        "host: 22",
        "",
        "host:99999999999999999999",
    ],
)
def test_parse_host_port_refuses(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_host_port(value, "collector.address")
    assert str(caught.value).startswith("collector.address: expected host:port")


def test_parse_host_port_refuses_a_superscript_port() -> None:
    with pytest.raises(ConfigError):
        parse_host_port("host:\u00b2", "collector.address")


def test_parse_host_port_refuses_a_non_ascii_digit_port() -> None:
    with pytest.raises(ConfigError):
        parse_host_port("host:\u0661", "collector.address")


def test_parse_host_port_refuses_an_unbracketed_ipv6_address() -> None:
    """`::1` must not silently become host ":" port 1."""
    with pytest.raises(ConfigError):
        parse_host_port("::1", "server.listen")


def test_parse_host_port_uses_the_default_port_for_a_bracketed_ipv6_address() -> None:
    assert parse_host_port("[::1]", "server.listen", 2222) == ("::1", 2222)


# --- DailyFileHandler --------------------------------------------------------------------


def record(message: str, created: float, *args: object) -> logging.LogRecord:
    rec = logging.LogRecord("backhaul.test", logging.WARNING, __file__, 1, message, args, None)
    rec.created = created
    return rec


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[DailyFileHandler]:
    h = DailyFileHandler(tmp_path)
    h.setFormatter(SafeFormatter("backhaul-collector"))
    yield h
    h.close()


def day_of(when: float) -> str:
    return time.strftime("%Y%m%d", time.localtime(when))


def test_handler_appends_to_the_file_named_for_the_day(
    handler: DailyFileHandler, tmp_path: Path
) -> None:
    now = time.time()
    handler.handle(record("stored %s", now, "hospital_20261126.sql.zst"))
    handler.handle(record("second record", now))
    path = tmp_path / f"{day_of(now)}.log"
    assert handler.path_for(now) == path
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING backhaul.test: stored hospital_20261126.sql.zst")
    assert "backhaul-collector[" in lines[0]
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0


def test_handler_writes_one_line_per_record_even_with_a_newline(
    handler: DailyFileHandler, tmp_path: Path
) -> None:
    now = time.time()
    handler.handle(record("database %s refused", now, "evil\n2026-11-26 FAKE ERROR\x1b[2J"))
    handler.handle(record("next", now))
    lines = (tmp_path / f"{day_of(now)}.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("database evil\\n2026-11-26 FAKE ERROR\\x1b[2J refused")


def test_handler_does_not_double_an_argument_escaped_at_its_call_site(
    handler: DailyFileHandler, tmp_path: Path
) -> None:
    """A name escaped where it was logged reads the same in the file, not with \\\\n."""
    now = time.time()
    handler.handle(record("agent aborted: %s", now, escape_control("oops\nFAKE \\ x")))
    line = (tmp_path / f"{day_of(now)}.log").read_text(encoding="utf-8").splitlines()[0]
    assert line.endswith("agent aborted: oops\\nFAKE \\\\ x")


def test_handler_keeps_a_traceback_on_one_line(handler: DailyFileHandler, tmp_path: Path) -> None:
    now = time.time()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.created = now
    handler.handle(rec)
    lines = (tmp_path / f"{day_of(now)}.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert "Traceback" in lines[0]
    assert "RuntimeError: boom" in lines[0]


def test_handler_switches_file_when_the_day_changes(
    handler: DailyFileHandler, tmp_path: Path
) -> None:
    first = time.mktime((2026, 11, 26, 12, 0, 0, 0, 0, -1))
    second = first + 86400
    handler.handle(record("day one", first))
    handler.handle(record("day two", second))
    handler.handle(record("day one again", first))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20261126.log", "20261127.log"]
    day_one = (tmp_path / "20261126.log").read_text(encoding="utf-8").splitlines()
    day_two = (tmp_path / "20261127.log").read_text(encoding="utf-8").splitlines()
    assert [line.rsplit(": ", 1)[1] for line in day_one] == ["day one", "day one again"]
    assert [line.rsplit(": ", 1)[1] for line in day_two] == ["day two"]
