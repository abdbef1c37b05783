"""PostgreSQL's pure parts: its agent.toml keys, its backup names, the passfile and
connection-string quoting, and the collector's engine/format pairs."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import pytest

from agent.config import PG_GLOBALS, SourceConfig, load_agent_config
from agent.engines.pg_dump import client_environment, passfile_line
from agent.engines.pg_inspect import PgParams
from agent.restore.pg_loader import conninfo_quote
from collector.serve.upload import ENGINES
from common.errors import ConfigError, DumpError
from common.naming import backup_name, extension_for, parse_backup_name

BASE = """
[agent]
name = "db1"

[collector]
address = "127.0.0.1:2222"
host_key = "collector.pub"
client_key = "agent_key"

[[sources]]
name = "pg"
engine = "{engine}"
user = "backhaul"
{source}
"""


def load(tmp_path: Path, source: str, engine: str = "postgresql") -> SourceConfig:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(BASE).format(engine=engine, source=source))
    return load_agent_config(path).sources[0]


def test_a_postgresql_source_defaults_to_port_5432_and_backs_up_the_globals_first(
    tmp_path: Path,
) -> None:
    source = load(tmp_path, 'databases = ["hospital", "my-db"]')
    assert source.port == 5432 and source.host == "127.0.0.1"
    assert source.databases == (PG_GLOBALS, "hospital", "my-db")
    assert source.format == "pgdump"


def test_globals_false_leaves_only_the_databases(tmp_path: Path) -> None:
    source = load(tmp_path, 'databases = ["hospital"]\nglobals = false\nsocket = "/run/pg"')
    assert source.databases == ("hospital",)
    assert str(source.socket) == "/run/pg"
    assert source.extra == {"globals": False}


def test_globals_is_refused_for_other_engines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="globals"):
        load(tmp_path, 'databases = ["hospital"]\nglobals = true', engine="mysql")


def test_the_globals_backup_name_sorts_first_and_reads_back() -> None:
    name = backup_name(PG_GLOBALS, date(2026, 11, 26), 1, extension_for("pgsql", "zstd"))
    assert name == "_globals_20261126.pgsql.zst"
    assert name < "hospital_20261126.pgdump.zst"
    parsed = parse_backup_name(name)
    assert parsed is not None and parsed.database == PG_GLOBALS and parsed.ext == "pgsql.zst"
    assert parse_backup_name("my-db_20261126-2.pgdump.gz") is not None


def test_the_collector_takes_both_postgresql_formats_and_no_other() -> None:
    assert ENGINES["postgresql"] == ("pgdump", "pgsql")
    assert "sql" not in ENGINES["postgresql"]


SECRET = "s3cret"


def params(user: str = "backhaul", password: str | None = SECRET) -> PgParams:
    return PgParams(host="db.example", port=5433, socket=None, user=user, password=password)


def test_passfile_escapes_colons_and_backslashes() -> None:
    assert passfile_line(params("a:b", r"p:w\d")) == "*:*:*:a\\:b:p\\:w\\\\d\n"


def test_passfile_refuses_a_line_break() -> None:
    with pytest.raises(DumpError, match="line break"):
        passfile_line(params(password="two\nlines"))


def test_the_client_environment_holds_no_password(tmp_path: Path) -> None:
    env = client_environment(params(), "-x", tmp_path / "pgpass")
    assert "s3cret" not in "".join(env.values())
    assert "PGPASSWORD" not in env and "HOME" not in env
    assert env["PGDATABASE"] == "-x" and env["PGPASSFILE"] == str(tmp_path / "pgpass")


def test_params_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(params())


def test_conninfo_quote_keeps_a_name_one_value() -> None:
    assert conninfo_quote("a b' host=evil \\") == "'a b\\' host=evil \\\\'"


class CountingLoader:
    """Stands for PostgresLoader's table count, the one thing the comparison reads."""

    def __init__(self, tables: int) -> None:
        self.tables = tables

    def count_tables(self, target: str) -> int:
        return self.tables


@pytest.mark.parametrize(("restored", "ok"), [(6, True), (5, False)])
async def test_a_postgresql_drill_compares_restored_tables_with_the_archive(
    restored: int, ok: bool
) -> None:
    from agent.restore.drill import _compare_postgres

    manifest = {"verification": {"pg_archive": {"tables": 6}}}
    result = await _compare_postgres(CountingLoader(restored), "scratch", manifest)  # type: ignore[arg-type]
    assert result.ok is ok
    assert ("as the archive lists" if ok else "lists 6 table(s), the restored database "
            "holds 5") in result.message
