"""The privileges a MySQL/MariaDB dump needs, checked before it starts.

Blocking (pymysql); run inside :func:`agent.engines.mysql_connect.connect`'s cursor, so
a failing query arrives as a one-line :class:`~common.errors.DumpError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

import pymysql

from agent.engines.mysql_connect import (
    ER_DBACCESS_DENIED,
    MySQLParams,
    error_code,
    error_text,
    quote_identifier,
    quoted_names,
)
from common.errors import DumpError

# Server error codes (https://mariadb.com/kb/en/mariadb-error-codes/).
_ER_TABLEACCESS_DENIED = 1142
_ER_COLUMNACCESS_DENIED = 1143
_ER_SPECIFIC_ACCESS_DENIED = 1227
_ER_VIEW_INVALID = 1356
_PRIVILEGE_DENIED = frozenset(
    {
        ER_DBACCESS_DENIED,
        _ER_TABLEACCESS_DENIED,
        _ER_COLUMNACCESS_DENIED,
        _ER_SPECIFIC_ACCESS_DENIED,
    }
)
_ROUTINE_GRANT_HINT = "grant SELECT ON mysql.proc in MariaDB, SHOW_ROUTINE in MySQL"


def check_privileges(
    cur: Any,
    params: MySQLParams,
    database: str,
    tables: Sequence[str],
    views: Sequence[str],
    flavor: str,
) -> list[str]:
    """Raise DumpError listing every privilege the dump needs and the user lacks.

    SELECT, SHOW VIEW and EVENT are tested by doing what the dump does, so roles and
    table-level grants count. TRIGGER cannot be tested that way (triggers the user may
    not see are simply absent), so it is read from information_schema's privilege views.
    LOCK TABLES is not needed: the dump runs in one transaction and takes no locks.
    Returns warnings about what could not be verified.
    """
    missing = _missing_on_tables_and_views(cur, tables, views)
    grantees = _grantees(cur)
    if tables:
        no_trigger = _tables_without_trigger_privilege(cur, grantees, database, tables)
        if no_trigger:
            missing.append(f"TRIGGER on {quoted_names(no_trigger)}")
    if _denied(cur, f"SHOW EVENTS FROM {quote_identifier(database)}"):
        missing.append("EVENT")
    hidden, verified = _hidden_routines(cur, grantees, database, flavor)
    if hidden:
        missing.append(f"to see the stored routines {quoted_names(hidden)} ({_ROUTINE_GRANT_HINT})")
    if missing:
        raise DumpError(
            f"user {params.user!r} lacks privileges to back up database {database!r} "
            f"on MySQL server at {params.endpoint}: needs " + "; ".join(missing)
        )
    if verified:
        return []
    return [
        f"cannot verify that user {params.user!r} sees every stored routine of "
        f"{database!r}; routines it cannot see are left out of the dump "
        f"({_ROUTINE_GRANT_HINT})"
    ]


def _missing_on_tables_and_views(
    cur: Any, tables: Sequence[str], views: Sequence[str]
) -> list[str]:
    """SELECT and SHOW VIEW the user lacks, each with the objects it lacks them on."""
    missing: list[str] = []
    denied_select = [
        name
        for name in (*tables, *views)
        # The dump reads every table and view; a zero-row SELECT proves it may.
        if _denied(cur, f"SELECT 1 FROM {quote_identifier(name)} LIMIT 0")  # noqa: S608
    ]
    if denied_select:
        missing.append(f"SELECT on {quoted_names(denied_select)}")
    denied_view = [v for v in views if _denied(cur, f"SHOW CREATE VIEW {quote_identifier(v)}")]
    if denied_view:
        missing.append(f"SHOW VIEW on {quoted_names(denied_view)}")
    return missing


def _hidden_routines(
    cur: Any, grantees: Sequence[str], database: str, flavor: str
) -> tuple[list[str], bool]:
    """Routines the dump would leave out, and whether the list is known to be complete.

    A routine whose definition the user cannot read makes the dump tool fail; one the
    user cannot see at all is silently skipped, so a complete list needs either
    ``mysql.proc`` (MariaDB) or a global SELECT or SHOW_ROUTINE privilege (MySQL).
    """
    cur.execute(
        "SELECT ROUTINE_NAME, ROUTINE_DEFINITION IS NULL FROM information_schema.ROUTINES "
        "WHERE ROUTINE_SCHEMA = %s ORDER BY ROUTINE_NAME",
        (database,),
    )
    rows = cur.fetchall()
    hidden = [str(r[0]) for r in rows if r[1]]
    readable = {str(r[0]) for r in rows if not r[1]}
    if flavor == "mariadb":
        proc = _rows_if_permitted(cur, "SELECT name FROM mysql.proc WHERE db = %s", (database,))
        if proc is None:
            return hidden, False
        hidden += sorted({str(r[0]) for r in proc} - readable - set(hidden))
        return hidden, True
    cur.execute(
        "SELECT GRANTEE FROM information_schema.USER_PRIVILEGES "
        "WHERE PRIVILEGE_TYPE IN ('SELECT', 'SHOW_ROUTINE')"
    )
    return hidden, any(str(r[0]) in grantees for r in cur.fetchall())


def _rows_if_permitted(cur: Any, sql: str, args: Sequence[Any]) -> list[Any] | None:
    """The rows of ``sql``, or None when the server refuses it for lack of a privilege."""
    try:
        cur.execute(sql, args)
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as exc:
        if error_code(exc) in _PRIVILEGE_DENIED:
            return None
        raise
    return list(cur.fetchall())


def _denied(cur: Any, sql: str) -> bool:
    """Run ``sql``; True when the server refuses it for lack of a privilege."""
    try:
        cur.execute(sql)
        cur.fetchall()
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as exc:
        code = error_code(exc)
        if code in _PRIVILEGE_DENIED:
            return True
        if code == _ER_VIEW_INVALID:
            raise DumpError(f"invalid view: {error_text(exc)}") from exc
        raise
    return False


def _tables_without_trigger_privilege(
    cur: Any, grantees: Sequence[str], database: str, tables: Sequence[str]
) -> list[str]:
    cur.execute(
        "SELECT GRANTEE FROM information_schema.USER_PRIVILEGES WHERE PRIVILEGE_TYPE = 'TRIGGER'"
    )
    if any(str(r[0]) in grantees for r in cur.fetchall()):
        return []
    cur.execute(
        "SELECT GRANTEE, TABLE_SCHEMA FROM information_schema.SCHEMA_PRIVILEGES "
        "WHERE PRIVILEGE_TYPE = 'TRIGGER'"
    )
    if any(
        str(r[0]) in grantees and _schema_pattern_matches(str(r[1]), database)
        for r in cur.fetchall()
    ):
        return []
    cur.execute(
        "SELECT GRANTEE, TABLE_NAME FROM information_schema.TABLE_PRIVILEGES "
        "WHERE PRIVILEGE_TYPE = 'TRIGGER' AND TABLE_SCHEMA = %s",
        (database,),
    )
    granted = {str(r[1]) for r in cur.fetchall() if str(r[0]) in grantees}
    return [t for t in tables if t not in granted]


def _grantees(cur: Any) -> list[str]:
    """The GRANTEE spellings information_schema uses for this user and its active role."""
    cur.execute("SELECT CURRENT_USER()")
    user, _, host = str(cur.fetchone()[0]).rpartition("@")
    grantees = [f"'{user}'@'{host}'"]
    with contextlib.suppress(pymysql.MySQLError):
        cur.execute("SELECT CURRENT_ROLE()")
        role = cur.fetchone()[0]
        if role and str(role).upper() != "NONE":
            for name in str(role).split(","):
                name = name.strip().strip("`")
                grantees += [f"'{name}'@''", f"'{name}'", f"'{name}'@'%'"]
    return grantees


def _schema_pattern_matches(pattern: str, database: str) -> bool:
    """Whether a database-level grant pattern (``%``, ``_`` wildcards; ``\\`` escapes) applies."""
    regex = []
    chars = iter(pattern)
    for ch in chars:
        if ch == "\\":
            regex.append(re.escape(next(chars, "\\")))
        elif ch == "%":
            regex.append(".*")
        elif ch == "_":
            regex.append(".")
        else:
            regex.append(re.escape(ch))
    return re.fullmatch("".join(regex), database, flags=re.DOTALL) is not None
