"""The MySQL/MariaDB control path: discovery, preflight checks and table checksums.

Everything here is blocking (pymysql); callers run it in a worker thread. pymysql's
exceptions are translated into :class:`~common.errors.DumpError` at this one boundary,
with one-line messages that name the server and the database but never the password.

Raises, for every public function:
    DumpError: the server is unreachable, refuses the credentials, lacks the database
        or a privilege the dump needs, or fails a query.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pymysql

from common.credentials import scrub
from common.errors import DumpError

SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema", "mysql", "sys"})
_BASE_TABLE_TYPES = ("BASE TABLE", "SYSTEM VERSIONED")
_LOCK_WAIT_TIMEOUT = 60
_CONNECT_TIMEOUT = 10
_MAX_NAMES_IN_MESSAGE = 5

# Server error codes (https://mariadb.com/kb/en/mariadb-error-codes/).
_ER_DBACCESS_DENIED = 1044
_ER_ACCESS_DENIED = 1045
_ER_BAD_DB = 1049
_ER_PARSE_ERROR = 1064
_ER_TABLEACCESS_DENIED = 1142
_ER_COLUMNACCESS_DENIED = 1143
_ER_SPECIFIC_ACCESS_DENIED = 1227
_ER_VIEW_INVALID = 1356
_CR_MIN_CLIENT_ERROR = 2000
_CR_CONNECTION_ERRORS = frozenset({2002, 2003, 2005})
_CR_LOST_CONNECTION = frozenset({2006, 2013})
_PRIVILEGE_DENIED = frozenset(
    {
        _ER_DBACCESS_DENIED,
        _ER_TABLEACCESS_DENIED,
        _ER_COLUMNACCESS_DENIED,
        _ER_SPECIFIC_ACCESS_DENIED,
    }
)
_ROUTINE_GRANT_HINT = "grant SELECT ON mysql.proc in MariaDB, SHOW_ROUTINE in MySQL"


@dataclass(frozen=True)
class MySQLParams:
    """How to reach a MySQL/MariaDB server; ``socket``, when set, wins over host and port."""

    host: str
    port: int
    socket: str | None
    user: str
    password: str | None

    def __repr__(self) -> str:
        password = "None" if self.password is None else "'***'"
        return (
            f"MySQLParams(host={self.host!r}, port={self.port!r}, socket={self.socket!r}, "
            f"user={self.user!r}, password={password})"
        )

    @property
    def endpoint(self) -> str:
        """Where the server is, for messages: the socket path or ``host:port``."""
        if self.socket:
            return f"socket {self.socket}"
        return f"{self.host}:{self.port}"

    @property
    def on_this_host(self) -> bool:
        """Whether the server is reached without leaving this machine: a socket, or a
        loopback host (``localhost``, 127.0.0.0/8, ``::1``)."""
        if self.socket or self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may well be another machine
            return False


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


def quote_identifier(name: str) -> str:
    """Quote a MySQL identifier with backticks."""
    return "`" + name.replace("`", "``") + "`"


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
        warnings = _check_privileges(cur, params, database, found.tables, found.views, flavor)
        binlog, binlog_warning = read_binlog_position(cur, flavor)
    if found.non_innodb:
        warnings.insert(
            0,
            "tables not in InnoDB are not covered by the dump's snapshot: "
            f"{_names(found.non_innodb)}",
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


# -- connection and error translation ---------------------------------------------------------


@contextlib.contextmanager
def connect(params: MySQLParams, database: str | None = None) -> Iterator[Any]:
    """A cursor on a fresh autocommit connection; pymysql errors become DumpError."""
    try:
        conn = pymysql.connect(
            host=params.host,
            port=params.port,
            unix_socket=params.socket,
            user=params.user,
            # pymysql would send a str password as latin-1; the dump tools send UTF-8.
            password=(params.password or "").encode("utf-8"),
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=_CONNECT_TIMEOUT,
            # Without TLS options pymysql tries TLS when the server offers it, and for
            # that loads the system's CA bundle on every connect (20 to 40 ms here,
            # twice per backup) only to verify nothing. On this host TLS protects
            # nothing, and the dump tool does not use it either.
            ssl_disabled=params.on_this_host,
            # A table held by LOCK TABLES ... WRITE would block the preflight for
            # MariaDB's default of a day, before any stall timer runs: fail in a minute.
            init_command=f"SET SESSION lock_wait_timeout = {_LOCK_WAIT_TIMEOUT}",
        )
    except pymysql.MySQLError as exc:
        raise _translate(exc, params, database) from exc
    try:
        with conn.cursor() as cur:
            yield cur
    except pymysql.MySQLError as exc:
        raise _translate(exc, params, database) from exc
    finally:
        if conn.open:
            with contextlib.suppress(pymysql.MySQLError):
                conn.close()


def _error_code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = exc.args
    return args[0] if args and isinstance(args[0], int) else None


def _error_text(exc: BaseException) -> str:
    args: tuple[Any, ...] = exc.args
    text = str(args[1]) if len(args) > 1 else str(exc)
    return " ".join(text.split())


def _translate(exc: BaseException, params: MySQLParams, database: str | None) -> DumpError:
    code = _error_code(exc)
    detail = _error_text(exc)
    where = params.endpoint
    if code == _ER_ACCESS_DENIED:
        message = f"MySQL server at {where} refused user {params.user!r}: {detail}"
    elif code in _CR_CONNECTION_ERRORS:
        message = f"cannot connect to MySQL server at {where}: {detail}"
    elif code == _ER_BAD_DB:
        message = f"database {database!r} does not exist on MySQL server at {where}"
    elif code == _ER_DBACCESS_DENIED and database is not None:
        message = (
            f"user {params.user!r} has no access to database {database!r} "
            f"on MySQL server at {where}: {detail}"
        )
    elif code in _CR_LOST_CONNECTION:
        message = f"lost connection to MySQL server at {where}: {detail}"
    else:
        scope = f" (database {database!r})" if database is not None else ""
        message = f"MySQL error {code} on server at {where}{scope}: {detail}"
    return DumpError(scrub(message, params.password))


# -- privileges -------------------------------------------------------------------------------


def _check_privileges(
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
            missing.append(f"TRIGGER on {_names(no_trigger)}")
    if _denied(cur, f"SHOW EVENTS FROM {quote_identifier(database)}"):
        missing.append("EVENT")
    hidden, verified = _hidden_routines(cur, grantees, database, flavor)
    if hidden:
        missing.append(f"to see the stored routines {_names(hidden)} ({_ROUTINE_GRANT_HINT})")
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
        missing.append(f"SELECT on {_names(denied_select)}")
    denied_view = [v for v in views if _denied(cur, f"SHOW CREATE VIEW {quote_identifier(v)}")]
    if denied_view:
        missing.append(f"SHOW VIEW on {_names(denied_view)}")
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
        if _error_code(exc) in _PRIVILEGE_DENIED:
            return None
        raise
    return list(cur.fetchall())


def _denied(cur: Any, sql: str) -> bool:
    """Run ``sql``; True when the server refuses it for lack of a privilege."""
    try:
        cur.execute(sql)
        cur.fetchall()
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as exc:
        code = _error_code(exc)
        if code in _PRIVILEGE_DENIED:
            return True
        if code == _ER_VIEW_INVALID:
            raise DumpError(f"invalid view: {_error_text(exc)}") from exc
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
        if (_error_code(exc) or 0) >= _CR_MIN_CLIENT_ERROR:
            raise
        return None, f"binlog position not recorded: {_error_text(exc)}"
    if row is None:
        return None, None
    result: dict[str, str | int] = {"file": str(row[0]), "position": int(row[1])}
    gtid_variable = "gtid_current_pos" if flavor == "mariadb" else "gtid_executed"
    try:
        cur.execute(f"SELECT @@GLOBAL.{gtid_variable}")
        value = cur.fetchone()[0]
    except pymysql.MySQLError as exc:
        if (_error_code(exc) or 0) >= _CR_MIN_CLIENT_ERROR:
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
            if _error_code(exc) == _ER_PARSE_ERROR and statement != statements[-1]:
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


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(quote_identifier(n) for n in names[:_MAX_NAMES_IN_MESSAGE])
    extra = len(names) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} and {extra} more" if extra > 0 else shown
