"""The MySQL/MariaDB control path: discovery, preflight checks, table checksums and the
binlog position.

Everything here is blocking (pymysql); callers run it in a worker thread. The
connection and its error translation are :mod:`agent.engines.mysql_connect`'s, the
privilege checks :mod:`agent.engines.mysql_privileges`'.

Raises, for every public function:
    DumpError: the server is unreachable, refuses the credentials, lacks the database
        or a privilege the dump needs, or fails a query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pymysql

from agent.engines.mysql_connect import (
    CR_MIN_CLIENT_ERROR,
    MySQLParams,
    connect,
    error_code,
    error_text,
    quote_identifier,
    quoted_names,
)
from agent.engines.mysql_privileges import check_privileges
from common.errors import DumpError

SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema", "mysql", "sys"})
_BASE_TABLE_TYPES = ("BASE TABLE", "SYSTEM VERSIONED")
_ER_PARSE_ERROR = 1064  # the server does not know a statement (SHOW BINARY LOG STATUS)

@dataclass(frozen=True)
class MySQLPreflight:
    """What a backup needs to know about one database before the dump starts.

    ``non_innodb_tables`` are base tables outside InnoDB: ``--single-transaction`` does
    not cover them, so the dump is not a consistent snapshot of them (callers warn).
    ``binlog`` is ``{"file": ..., "position": ...}`` plus ``gtid_current_pos`` (MariaDB)
    or ``gtid_executed`` (MySQL), or None when binary logging is off or not visible to
    this user. It is read just before the dump, not inside its snapshot.
    ``warnings`` are one-line sentences for the log: non-InnoDB tables, stored routines
    whose visibility could not be verified, a binlog position that could not be read.
    """

    database: str
    server_version: str
    engine_flavor: Literal["mariadb", "mysql"]
    tables: list[str]
    views: list[str]
    non_innodb_tables: list[str]
    size_estimate: int
    binlog: dict[str, str | int] | None
    warnings: list[str] = field(default_factory=list)


def discover_databases(params: MySQLParams) -> list[str]:
    """Every database the user can see, except the system schemas, sorted."""
    with connect(params) as cur:
        cur.execute("SHOW DATABASES")
        names = [str(row[0]) for row in cur.fetchall()]
    return sorted(name for name in names if name.lower() not in SYSTEM_SCHEMAS)


def preflight(params: MySQLParams, database: str) -> MySQLPreflight:
    """Connect to ``database``, check the dump's privileges and describe what will be dumped.

    Raises:
        DumpError: unreachable server, wrong credentials, unknown database, a privilege
            the dump needs is missing (SELECT, SHOW VIEW, TRIGGER, EVENT, routine
            definitions), or a view is invalid.
    """
    with connect(params, database) as cur:
        version, flavor = _server_version(cur)
        found = _describe_tables(cur, database)
        warnings = check_privileges(cur, params, database, found.tables, found.views, flavor)
        binlog, binlog_warning = read_binlog_position(cur, flavor)
    if found.non_innodb:
        warnings.insert(
            0,
            "tables not in InnoDB are not covered by the dump's snapshot: "
            f"{quoted_names(found.non_innodb)}",
        )
    if binlog_warning:
        warnings.append(binlog_warning)
    return MySQLPreflight(
        database=database,
        server_version=version,
        engine_flavor=flavor,
        tables=found.tables,
        views=found.views,
        non_innodb_tables=found.non_innodb,
        size_estimate=found.size,
        binlog=binlog,
        warnings=warnings,
    )


def _server_version(cur: Any) -> tuple[str, Literal["mariadb", "mysql"]]:
    """The server's version string, and whether it is MariaDB or MySQL."""
    cur.execute("SELECT VERSION(), @@version_comment")
    version, comment = cur.fetchone()
    flavor: Literal["mariadb", "mysql"] = (
        "mariadb" if "mariadb" in f"{version} {comment}".lower() else "mysql"
    )
    return str(version), flavor


@dataclass(frozen=True)
class _Tables:
    """A database's base tables and views as information_schema lists them."""

    tables: list[str]
    views: list[str]
    non_innodb: list[str]  # base tables the dump's snapshot does not cover
    size: int  # data and index bytes of the base tables


def _describe_tables(cur: Any, database: str) -> _Tables:
    cur.execute(
        "SELECT TABLE_NAME, TABLE_TYPE, ENGINE, "
        "COALESCE(DATA_LENGTH, 0) + COALESCE(INDEX_LENGTH, 0) "
        "FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME",
        (database,),
    )
    rows = cur.fetchall()
    base = [r for r in rows if r[1] in _BASE_TABLE_TYPES]
    return _Tables(
        tables=[str(r[0]) for r in base],
        views=[str(r[0]) for r in rows if r[1] == "VIEW"],
        non_innodb=[str(r[0]) for r in base if str(r[2] or "").lower() != "innodb"],
        size=sum(int(r[3] or 0) for r in base),
    )


def table_checksums(params: MySQLParams, database: str) -> dict[str, dict[str, int]]:
    """``{"rows": COUNT(*), "checksum": CHECKSUM TABLE}`` for every base table of ``database``."""
    result: dict[str, dict[str, int]] = {}
    with connect(params, database) as cur:
        for table in _base_tables(cur, database):
            quoted = quote_identifier(table)
            cur.execute(f"SELECT COUNT(*) FROM {quoted}")  # noqa: S608 - quoted identifier
            rows = int(cur.fetchone()[0])
            cur.execute(f"CHECKSUM TABLE {quoted}")
            checksum = cur.fetchone()[1]
            if checksum is None:
                raise DumpError(
                    f"CHECKSUM TABLE gave no value for {database}.{table} on {params.endpoint}"
                )
            result[table] = {"rows": rows, "checksum": int(checksum)}
    return result


# -- binlog -----------------------------------------------------------------------------------


def read_binlog_position(cur: Any, flavor: str) -> tuple[dict[str, str | int] | None, str | None]:
    """The binlog file, position and GTID set (or None), and a warning if not permitted.

    Lacking the privilege to read the position never fails a backup.
    """
    try:
        cur.execute("SELECT @@GLOBAL.log_bin")
        if not int(cur.fetchone()[0] or 0):
            return None, None
        row = _binlog_status_row(cur, flavor)
    except pymysql.MySQLError as exc:
        if (error_code(exc) or 0) >= CR_MIN_CLIENT_ERROR:
            raise
        return None, f"binlog position not recorded: {error_text(exc)}"
    if row is None:
        return None, None
    result: dict[str, str | int] = {"file": str(row[0]), "position": int(row[1])}
    gtid_variable = "gtid_current_pos" if flavor == "mariadb" else "gtid_executed"
    try:
        cur.execute(f"SELECT @@GLOBAL.{gtid_variable}")
        value = cur.fetchone()[0]
    except pymysql.MySQLError as exc:
        if (error_code(exc) or 0) >= CR_MIN_CLIENT_ERROR:
            raise
        return result, None
    if value is not None:
        result[gtid_variable] = "".join(str(value).split())
    return result, None


def _binlog_status_row(cur: Any, flavor: str) -> tuple[Any, ...] | None:
    # MySQL 8.4 dropped SHOW MASTER STATUS; 8.2 introduced SHOW BINARY LOG STATUS.
    statements = (
        ["SHOW MASTER STATUS"]
        if flavor == "mariadb"
        else ["SHOW BINARY LOG STATUS", "SHOW MASTER STATUS"]
    )
    for statement in statements:
        try:
            cur.execute(statement)
        except pymysql.err.ProgrammingError as exc:
            if error_code(exc) == _ER_PARSE_ERROR and statement != statements[-1]:
                continue
            raise
        row = cur.fetchone()
        return tuple(row) if row else None
    return None


def _base_tables(cur: Any, database: str) -> list[str]:
    cur.execute(
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "
        "AND TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') ORDER BY TABLE_NAME",
        (database,),
    )
    return [str(r[0]) for r in cur.fetchall()]
