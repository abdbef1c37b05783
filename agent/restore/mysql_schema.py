"""The MySQL/MariaDB statements restores and drills need, beyond the dump's control path.

Whether a target database exists and holds anything, creating and dropping it, reading
the binary-log position after a dump, and whether this user may keep its own writes out
of the binary log. Blocking (pymysql); callers run it in a worker thread. It shares
:mod:`agent.engines.mysql_connect`'s connection, so errors arrive as one-line
:class:`~common.errors.DumpError` messages without the password.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pymysql

from agent.engines.mysql_connect import MySQLParams, connect, quote_identifier
from agent.engines.mysql_inspect import read_binlog_position
from common.errors import DumpError

MAX_NAME = 64  # MySQL's limit for a database name
DEFAULT_CHARSET = "utf8mb4"


@dataclass(frozen=True)
class SchemaState:
    """What a database holds: tables and views, routines, events."""

    exists: bool
    objects: int = 0
    charset: str | None = None
    collation: str | None = None


def check_database_name(name: str) -> None:
    """Refuse a target name the server would refuse anyway, before anything is fetched.

    Raises:
        DumpError: empty, too long, or with a character no database name may hold.
    """
    if not name or len(name) > MAX_NAME or name != name.rstrip() or "\0" in name:
        raise DumpError(f"{name!r} is not a valid MySQL database name")


@contextlib.contextmanager
def _cursor(params: MySQLParams, *, skip_binlog: bool = False) -> Iterator[Any]:
    with connect(params) as cur:
        if skip_binlog:
            cur.execute("SET SESSION sql_log_bin = 0")
        yield cur


def schema_state(params: MySQLParams, name: str) -> SchemaState:
    """Whether ``name`` exists and how many tables, views, routines and events it has."""
    with _cursor(params) as cur:
        cur.execute(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
            "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
            (name,),
        )
        row = cur.fetchone()
        if row is None:
            return SchemaState(exists=False)
        objects = 0
        for table, column in (
            ("TABLES", "TABLE_SCHEMA"),
            ("ROUTINES", "ROUTINE_SCHEMA"),
            ("EVENTS", "EVENT_SCHEMA"),
        ):
            # Only fixed names are formatted in; the database name is a parameter.
            cur.execute(
                f"SELECT COUNT(*) FROM information_schema.{table} WHERE {column} = %s",  # noqa: S608
                (name,),
            )
            objects += int(cur.fetchone()[0])
        return SchemaState(True, objects, str(row[0]), str(row[1]))


def create_database(
    params: MySQLParams,
    name: str,
    charset: str | None = None,
    collation: str | None = None,
    *,
    skip_binlog: bool = False,
) -> None:
    """``CREATE DATABASE name`` with the given (or utf8mb4) defaults."""
    charset = _word(charset or DEFAULT_CHARSET)
    sql = f"CREATE DATABASE {quote_identifier(name)} CHARACTER SET {charset}"
    if collation:
        sql += f" COLLATE {_word(collation)}"
    with _cursor(params, skip_binlog=skip_binlog) as cur:
        cur.execute(sql)


def drop_database(params: MySQLParams, name: str, *, skip_binlog: bool = False) -> None:
    """``DROP DATABASE IF EXISTS name``."""
    with _cursor(params, skip_binlog=skip_binlog) as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {quote_identifier(name)}")


def binlog_position(params: MySQLParams) -> dict[str, str | int] | None:
    """The server's binlog file, position and GTID set now; None when not available."""
    with _cursor(params) as cur:
        cur.execute("SELECT VERSION(), @@version_comment")
        version, comment = cur.fetchone()
        flavor = "mariadb" if "mariadb" in f"{version} {comment}".lower() else "mysql"
        position, _warning = read_binlog_position(cur, flavor)
    return position


def may_skip_binlog(params: MySQLParams) -> bool:
    """Whether this user may keep its session's writes out of the binary log.

    A drill's scratch database should not travel to replicas; that needs SUPER or
    BINLOG ADMIN, which a backup user may well lack, so it is tried, not assumed.
    """
    try:
        with _cursor(params, skip_binlog=True):
            return True
    except DumpError as exc:
        if isinstance(exc.__cause__, pymysql.MySQLError) and _is_privilege_error(exc.__cause__):
            return False
        raise


def _is_privilege_error(exc: pymysql.MySQLError) -> bool:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    return code in (1227, 1044, 1045, 1142)  # ER_SPECIFIC_ACCESS_DENIED and kin


def _word(value: str) -> str:
    """A character set or collation name: letters, digits and underscores only."""
    if not value or not all(c.isascii() and (c.isalnum() or c == "_") for c in value):
        raise DumpError(f"unexpected character set or collation name {value!r}")
    return value
