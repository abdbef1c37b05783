"""How the agent reaches a MySQL/MariaDB server: its parameters, one connection, and the
translation of pymysql's errors.

Everything here is blocking (pymysql); callers run it in a worker thread. pymysql's
exceptions are translated into :class:`~common.errors.DumpError` at this one boundary,
with one-line messages that name the server and the database but never the password.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator, Sequence
from typing import Any

import pymysql

from agent.engines.server_params import ServerParams
from common.credentials import scrub
from common.errors import DumpError

_LOCK_WAIT_TIMEOUT = 60
_CONNECT_TIMEOUT = 10
_MAX_NAMES_IN_MESSAGE = 5

# Server error codes (https://mariadb.com/kb/en/mariadb-error-codes/).
ER_DBACCESS_DENIED = 1044
_ER_ACCESS_DENIED = 1045
_ER_BAD_DB = 1049
CR_MIN_CLIENT_ERROR = 2000  # codes from here on are the client's own: connection trouble
_CR_CONNECTION_ERRORS = frozenset({2002, 2003, 2005})
_CR_LOST_CONNECTION = frozenset({2006, 2013})


class MySQLParams(ServerParams):
    """How to reach a MySQL/MariaDB server; ``socket``, when set, wins over host and port."""

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


def quote_identifier(name: str) -> str:
    """Quote a MySQL identifier with backticks."""
    return "`" + name.replace("`", "``") + "`"


def quoted_names(names: Sequence[str]) -> str:
    """The first few ``names`` quoted, for a message, and how many more there are."""
    shown = ", ".join(quote_identifier(n) for n in names[:_MAX_NAMES_IN_MESSAGE])
    extra = len(names) - _MAX_NAMES_IN_MESSAGE
    return f"{shown} and {extra} more" if extra > 0 else shown


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


def error_code(exc: BaseException) -> int | None:
    """The server's (or client's) numeric error code of a pymysql error, if it has one."""
    args: tuple[Any, ...] = exc.args
    return args[0] if args and isinstance(args[0], int) else None


def error_text(exc: BaseException) -> str:
    """The error's message on one line, without its code."""
    args: tuple[Any, ...] = exc.args
    text = str(args[1]) if len(args) > 1 else str(exc)
    return " ".join(text.split())


def _translate(exc: BaseException, params: MySQLParams, database: str | None) -> DumpError:
    code = error_code(exc)
    detail = error_text(exc)
    where = params.endpoint
    if code == _ER_ACCESS_DENIED:
        message = f"MySQL server at {where} refused user {params.user!r}: {detail}"
    elif code in _CR_CONNECTION_ERRORS:
        message = f"cannot connect to MySQL server at {where}: {detail}"
    elif code == _ER_BAD_DB:
        message = f"database {database!r} does not exist on MySQL server at {where}"
    elif code == ER_DBACCESS_DENIED and database is not None:
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
