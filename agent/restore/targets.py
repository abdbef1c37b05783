"""Where a restore loads a backup: a MySQL/MariaDB database through the stock client, or
a MongoDB database through :func:`agent.restore.mongo_loader.restore_archive`.

A loader knows its database server and nothing of the collector: it says whether a
target holds anything, prepares it (creates it, or drops and recreates it when asked to
replace it), takes the decompressed dump chunk by chunk, and drops scratch databases.
Nothing touches the database host's disk: the SQL goes to the client's stdin and the
client's credentials sit in a private, memory-backed option file for the load's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from agent.engines.mongo_connect import MongoParams, connect, translate_errors
from agent.engines.mysql_connect import MySQLParams
from agent.engines.mysql_dump import client_option_file, find_client_tool
from agent.restore import mysql_schema
from agent.restore.mongo_loader import RestoreResult, restore_archive
from agent.restore.mysql_grants import missing_restore_privileges
from agent.restore.mysql_schema import SchemaState
from agent.restore.sql_objects import SqlObjects
from common.credentials import scrub
from common.errors import BackhaulError, DumpError

log = logging.getLogger(__name__)
STDERR_LIMIT = 64 * 1024
_STDERR_LINES_IN_MESSAGE = 3
_QUEUE_CHUNKS = 8


class Sink(Protocol):
    """Takes the decompressed dump of one restore."""

    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> None: ...


class Loader(Protocol):
    engine: str

    def check_name(self, target: str) -> None: ...
    async def check_privileges(self, target: str, objects: SqlObjects) -> None: ...
    async def state(self, target: str) -> SchemaState: ...
    async def prepare(self, target: str, *, replace: bool) -> None: ...
    def load(self, target: str) -> AbstractAsyncContextManager[Sink]: ...
    async def drop(self, target: str) -> None: ...


# -- MySQL / MariaDB -------------------------------------------------------------------------


class MySQLLoader:
    """Loads SQL with ``mariadb``/``mysql`` reading stdin.

    ``skip_binlog`` keeps the load and the create/drop statements out of the binary log
    (a drill's scratch database has no business on replicas); it needs a privilege the
    caller has checked with :func:`agent.restore.mysql_schema.may_skip_binlog`.
    """

    engine = "mysql"

    def __init__(self, params: MySQLParams, *, skip_binlog: bool = False) -> None:
        self.params = params
        self.skip_binlog = skip_binlog

    def check_name(self, target: str) -> None:
        mysql_schema.check_database_name(target)

    async def check_privileges(self, target: str, objects: SqlObjects) -> None:
        """Refuse, naming them, the privileges this dump needs that the account lacks.

        Raises:
            DumpError: privileges are missing, or the server cannot be queried.
        """
        missing = await asyncio.to_thread(missing_restore_privileges, self.params, target,
                                          objects.kinds, objects.definers)
        if missing:
            raise DumpError(
                f"user {self.params.user!r} cannot restore into {target!r}: it lacks "
                f"{'; '.join(missing)}. Grant these (see the README's restore grants), "
                "then run the restore again; nothing was changed"
            )

    async def state(self, target: str) -> SchemaState:
        return await asyncio.to_thread(mysql_schema.schema_state, self.params, target)

    async def prepare(self, target: str, *, replace: bool) -> None:
        state = await self.state(target)
        if state.exists and not replace:
            return
        if state.exists:
            log.warning("dropping database %r to replace it with the backup", target)
            await self.drop(target)
        await asyncio.to_thread(
            mysql_schema.create_database,
            self.params,
            target,
            state.charset,
            state.collation,
            skip_binlog=self.skip_binlog,
        )

    async def drop(self, target: str) -> None:
        await asyncio.to_thread(
            mysql_schema.drop_database, self.params, target, skip_binlog=self.skip_binlog
        )

    @contextlib.asynccontextmanager
    async def load(self, target: str) -> AsyncIterator[Sink]:
        tool = find_client_tool()
        with client_option_file(self.params) as option_file:
            proc = await _start_client(tool, option_file, target, self.skip_binlog)
            sink = ClientSink(proc, Path(tool).name, target, self.params.password)
            try:
                yield sink
            finally:
                await sink.stop()


async def _start_client(
    tool: str, option_file: Path, target: str, skip_binlog: bool
) -> asyncio.subprocess.Process:
    args = [
        f"--defaults-extra-file={option_file}",
        "--batch",
        "--default-character-set=utf8mb4",
        f"--database={target}",
    ]
    if skip_binlog:
        args.append("--init-command=SET SESSION sql_log_bin = 0")
    try:
        return await asyncio.create_subprocess_exec(
            tool,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # No HOME: no ~/.my.cnf can override the option file, no history is written.
            env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"},
            start_new_session=True,
        )
    except OSError as exc:
        raise DumpError(f"cannot start {Path(tool).name}: {exc.strerror or exc}") from exc


class ClientSink:
    def __init__(
        self, proc: asyncio.subprocess.Process, tool: str, target: str, password: str | None
    ) -> None:
        self._proc = proc
        self._tool = tool
        self._target = target
        self._password = password
        self._stderr = bytearray()
        self._stderr_task = asyncio.create_task(self._collect_stderr())

    async def _collect_stderr(self) -> None:
        assert self._proc.stderr is not None
        while data := await self._proc.stderr.read(STDERR_LIMIT):
            self._stderr += data
            del self._stderr[:-STDERR_LIMIT]

    async def write(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._failure() from None

    async def finish(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self._proc.stdin.wait_closed()
        if await self._proc.wait() != 0:
            raise await self._failure()
        await self._stderr_task

    def stderr_text(self) -> str:
        """What the client wrote to stderr so far (its tail), without the password."""
        text = scrub(self._stderr.decode("utf-8", errors="replace"), self._password)
        return text

    async def _failure(self) -> DumpError:
        returncode = await self._proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task
        text = self.stderr_text()
        lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
        tail = " | ".join(lines[-_STDERR_LINES_IN_MESSAGE:])
        message = f"{self._tool} exited with status {returncode} loading into {self._target!r}"
        return DumpError(
            f"{message}: {tail}" if tail else message, returncode=returncode, stderr=text
        )

    async def stop(self) -> None:
        """Kill the client if it still runs (the restore failed or was cancelled)."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        if not self._stderr_task.done():
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task


# -- MongoDB ---------------------------------------------------------------------------------


class MongoLoader:
    """Loads an archive with pymongo, in a worker thread fed through a bounded queue."""

    engine = "mongodb"

    def __init__(self, params: MongoParams) -> None:
        self.params = params
        self.result: RestoreResult | None = None

    def check_name(self, target: str) -> None:
        if not target or len(target) > 63 or any(c in target for c in '/\\. "$\0'):
            raise DumpError(f"{target!r} is not a valid MongoDB database name")

    async def check_privileges(self, target: str, objects: SqlObjects) -> None:
        """Nothing to check up front: a MongoDB restore creates collections only."""

    async def state(self, target: str) -> SchemaState:
        names = await asyncio.to_thread(self._collections, target)
        return SchemaState(exists=bool(names), objects=len(names))

    def _collections(self, target: str) -> list[str]:
        client = connect(self.params)
        try:
            with translate_errors(self.params, f"listing collections of {target!r}"):
                return list(client[target].list_collection_names())
        finally:
            client.close()

    async def prepare(self, target: str, *, replace: bool) -> None:
        if replace:
            log.warning("dropping database %r to replace it with the backup", target)
            await self.drop(target)

    async def drop(self, target: str) -> None:
        await asyncio.to_thread(self._drop, target)

    def _drop(self, target: str) -> None:
        client = connect(self.params)
        try:
            with translate_errors(self.params, f"dropping {target!r}"):
                client.drop_database(target)
        finally:
            client.close()

    def count_documents(self, target: str) -> dict[str, int]:
        """Documents per collection of ``target`` (views excluded); blocking."""
        client = connect(self.params)
        try:
            with translate_errors(self.params, f"counting documents of {target!r}"):
                db = client[target]
                names = [
                    c["name"]
                    for c in db.list_collections()
                    if c.get("type", "collection") == "collection"
                    and not c["name"].startswith("system.")
                ]
                return {name: int(db[name].count_documents({})) for name in names}
        finally:
            client.close()

    @contextlib.asynccontextmanager
    async def load(self, target: str) -> AsyncIterator[Sink]:
        sink = _ThreadSink(self.params, target)
        try:
            yield sink
            self.result = sink.result
        finally:
            await sink.stop()


class _Stop(Exception):
    """The async side gave up; the restore thread unwinds."""


class _ThreadSink:
    """Bridges async writes to :func:`restore_archive`'s blocking iterator."""

    def __init__(self, params: MongoParams, target: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self._stopping = threading.Event()
        self.result: RestoreResult | None = None
        self._task = asyncio.create_task(
            asyncio.to_thread(restore_archive, params, self._chunks(), target)
        )

    def _chunks(self) -> Iterator[bytes]:
        while not self._stopping.is_set():
            item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _put(self, item: bytes | BaseException | None) -> None:
        put = asyncio.create_task(self._queue.put(item))
        done, _ = await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if put in done:
            return
        put.cancel()
        self._task.result()  # the restore failed: raise why
        raise DumpError("the MongoDB restore stopped before the archive ended")

    async def write(self, data: bytes) -> None:
        await self._put(data)

    async def finish(self) -> None:
        await self._put(None)
        self.result = await self._task

    async def stop(self) -> None:
        if self._task.done():
            with contextlib.suppress(BackhaulError, _Stop):
                self._task.result()
            return
        self._stopping.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_Stop("restore abandoned"))
        # Whatever the thread ends with, the error that stopped the restore is already
        # on its way up; this only waits for the thread to let go of the server.
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)
