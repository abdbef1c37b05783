"""Streams one MySQL/MariaDB database as SQL from ``mariadb-dump``/``mysqldump`` stdout.

Credentials travel only through a 0600 option file in a private 0700 directory (memory
backed when possible), removed once the tool has read it (its first output, which with
the 256 KiB output buffer comes once it has that much to say) and in any case when the
dump ends: never argv, never the environment, never a log line.
The dump is a single-transaction snapshot of the named database without
``CREATE DATABASE``/``USE``, so it restores into any name. The process handling is
:class:`~agent.engines.tool_dump.ToolDump`'s, shared with the PostgreSQL dump
(:mod:`agent.engines.pg_dump`)::

    async with MySQLDump(params, "hospital") as dump:
        result = await pump(dump, compressor, send)

Reading is pull-based: when the consumer is slow the pipe fills and the dump tool
blocks, which is the back-pressure. stdout is a plain pipe read in a worker thread,
never by the event loop, and the tool writes it 256 KiB at a time
(:func:`~agent.engines.tool_dump.buffered_command`): the agent's pump
(:mod:`agent.stream.compress_thread`) reads it, compresses and hashes in one thread
through :meth:`MySQLDump.pipe_reader`, :meth:`~MySQLDump.note_read` and
:meth:`~MySQLDump.finish`. Only :meth:`finish` checks the exit status.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from agent.engines.mysql_connect import MySQLParams
from agent.engines.private_file import private_file
from agent.engines.tool_dump import ToolDump
from common.errors import DumpError

DUMP_TOOLS = ("mariadb-dump", "mysqldump")
CLIENT_TOOLS = ("mariadb", "mysql")
_OPTION_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b"}


def find_dump_tool(path: str | None = None) -> str:
    """The path of ``mariadb-dump``, else ``mysqldump``, on ``path`` (default: PATH).

    Raises:
        DumpError: neither is installed.
    """
    return _find_tool(DUMP_TOOLS, path)


def find_client_tool(path: str | None = None) -> str:
    """The path of ``mariadb``, else ``mysql``, on ``path`` (default: PATH).

    Raises:
        DumpError: neither is installed.
    """
    return _find_tool(CLIENT_TOOLS, path)


def _find_tool(names: tuple[str, str], path: str | None) -> str:
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    raise DumpError(f"neither {names[0]} nor {names[1]} found on PATH")


def dump_arguments(option_file: Path, database: str) -> list[str]:
    """The dump tool's arguments, after its path.

    ``--single-transaction`` gives an InnoDB snapshot without locks, so
    ``--skip-lock-tables`` (and no LOCK TABLES privilege) is right, not a shortcut;
    ``--quick`` streams rows instead of buffering tables. ``--no-tablespaces`` avoids
    needing PROCESS on MySQL 8. ``--`` keeps a name starting with ``-`` from being
    read as an option.
    """
    return [
        f"--defaults-extra-file={option_file}",
        "--single-transaction",
        "--quick",
        "--skip-lock-tables",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--default-character-set=utf8mb4",
        "--no-tablespaces",
        "--",
        database,
    ]


def option_value(value: str) -> str:
    """Quote ``value`` for a MySQL option file (double quotes, backslash escapes).

    Raises:
        DumpError: the value contains a NUL byte, which option files cannot carry.
    """
    if "\0" in value:
        raise DumpError("a connection setting contains a NUL byte; option files cannot carry it")
    return '"' + "".join(_OPTION_ESCAPES.get(ch, ch) for ch in value) + '"'


def option_file_text(params: MySQLParams) -> str:
    """The ``[client]`` section for ``params``; socket and protocol are explicit."""
    lines = ["[client]", f"user={option_value(params.user)}"]
    if params.password is not None:
        lines.append(f"password={option_value(params.password)}")
    if params.socket:
        lines += ["protocol=socket", f"socket={option_value(params.socket)}"]
    else:
        lines += ["protocol=tcp", f"host={option_value(params.host)}", f"port={int(params.port)}"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def client_option_file(params: MySQLParams) -> Iterator[Path]:
    """A 0600 option file with ``params``, in a private directory removed on exit.

    Raises:
        DumpError: the file cannot be created or a setting cannot be written to it.
    """
    text = option_file_text(params)
    with private_file(
        text, name="client.cnf", prefix="backhaul-mysql-", what="MySQL option file"
    ) as path:
        yield path


class MySQLDump(ToolDump):
    """A dump of one MySQL/MariaDB database by ``mariadb-dump``/``mysqldump``."""

    params: MySQLParams

    def __init__(self, params: MySQLParams, database: str, *, tool: str | None = None) -> None:
        super().__init__(params, database, tool=tool)

    def _default_tool(self) -> str:
        return find_dump_tool()

    def _credentials(self) -> AbstractContextManager[Path]:
        return client_option_file(self.params)

    def _arguments(self, credentials: Path) -> list[str]:
        return dump_arguments(credentials, self.database)
