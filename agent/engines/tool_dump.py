"""One running dump tool streaming a database from its stdout: start it with private
credentials, hand its pipe to the pump, judge its exit status, kill it on early exit.

The process handling every tool-based engine shares (:mod:`agent.engines.mysql_dump`,
:mod:`agent.engines.pg_dump`); a subclass says which tool, with which arguments,
environment and private credentials file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from agent.stream.pipe import PipeReader, widen
from common.credentials import scrub
from common.errors import DumpError

logger = logging.getLogger(__name__)

STDERR_LIMIT = 64 * 1024
_STDERR_LINES_IN_MESSAGE = 3
_REAP_TIMEOUT = 10.0
DUMP_OUTPUT_BUFFER = "256K"  # in stdbuf's units: 256 KiB


def buffered_command(tool: str, path: str | None = None) -> list[str]:
    """``tool`` run with a 256 KiB stdout buffer, through coreutils' ``stdbuf``.

    The dump tools write stdout through stdio, whose buffer on a pipe is one 4 KiB
    page: a quarter of a million writes per GB, each waking the reader. In 256 KiB
    writes (four fit in the widened pipe, :func:`agent.stream.pipe.widen`) the system time of
    the dump tool and its reader fell from 1.6 s to 0.9 to 1.0 s per GB. ``stdbuf`` execs
    the tool, which keeps its pid, exit status and signals. Without ``stdbuf`` (it is
    in coreutils) the tool runs as it is.
    """
    stdbuf = shutil.which("stdbuf", path=path)
    if stdbuf is None:
        return [tool]
    return [stdbuf, f"--output={DUMP_OUTPUT_BUFFER}", tool]


def cannot_start(program: str, reason: object) -> DumpError:
    """The one wording for a program that could not be started, named by file name."""
    return DumpError(f"cannot start {Path(program).name}: {reason}")


def _check_executable(tool: str) -> None:
    """Raises:
        DumpError: ``tool`` is missing or not an executable file.
    """
    try:
        is_file = stat.S_ISREG(os.stat(tool).st_mode)
    except OSError as exc:
        raise cannot_start(tool, exc.strerror or exc) from None
    if not is_file or not os.access(tool, os.X_OK):
        raise cannot_start(tool, "not an executable file")


def _minimal_env() -> dict[str, str]:
    # No HOME: the tool then reads no ~/.my.cnf that could override our option file.
    return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}


class DumpEndpoint(Protocol):
    """What a running dump needs to know of its server: where it is, for messages, and
    the password, to scrub from them."""

    @property
    def endpoint(self) -> str: ...
    @property
    def password(self) -> str | None: ...


class ToolDump:
    """One running dump tool for one database, an async context manager read through
    :meth:`pipe_reader` (by the pump).

    ``bytes_read`` counts the bytes the consumer has read so far. Leaving the context
    before the end (an error, cancellation) kills and reaps the process. :meth:`finish`
    raises DumpError if the tool failed. Subclasses say which tool, with which
    arguments, environment and private credentials file.
    """

    def __init__(
        self,
        params: DumpEndpoint,
        database: str,
        *,
        tool: str | None = None,
    ) -> None:
        self.params = params
        self.database = database
        self.bytes_read = 0
        self._tool = tool
        self._option_file: contextlib.ExitStack | None = None
        self.option_file: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None
        self._stdout: PipeReader | None = None
        self._finished = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(database={self.database!r}, params={self.params!r})"

    def _default_tool(self) -> str:
        raise NotImplementedError

    def _credentials(self) -> AbstractContextManager[Path]:
        raise NotImplementedError

    def _arguments(self, credentials: Path) -> list[str]:
        raise NotImplementedError

    def _environment(self, credentials: Path) -> dict[str, str]:
        return _minimal_env()

    @property
    def tool(self) -> str | None:
        """The path of the dump tool (found on PATH when entering, unless given)."""
        return self._tool

    @property
    def pid(self) -> int | None:
        """The dump process's id once started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The dump process's exit status once reaped (negative: killed by that signal)."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def stderr(self) -> str:
        """The last ``STDERR_LIMIT`` bytes the tool wrote to stderr (warnings, errors)."""
        return scrub(self._stderr.decode("utf-8", errors="replace"), self.params.password)

    async def __aenter__(self) -> Self:
        tool = self._tool or self._default_tool()
        _check_executable(tool)  # behind stdbuf, exec's own error would come as an exit status
        stack = contextlib.ExitStack()
        self.option_file = stack.enter_context(self._credentials())
        self._option_file = stack
        read_fd, write_fd = os.pipe()  # both close-on-exec; the child gets a dup as fd 1
        widen(read_fd)
        command = buffered_command(tool)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                *self._arguments(self.option_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=asyncio.subprocess.PIPE,
                env=self._environment(self.option_file),
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            self._remove_option_file()
            # Named for what failed to start: stdbuf when the tool runs behind it.
            raise cannot_start(command[0], exc.strerror or exc) from exc
        except BaseException:
            os.close(read_fd)
            self._remove_option_file()
            raise
        finally:
            os.close(write_fd)  # ours closed: the pipe ends when the tool's end does
        self._tool = tool
        self._stdout = PipeReader(read_fd)
        self._stderr_task = asyncio.create_task(self._collect_stderr())
        logger.debug("started %s (pid %d) for database %r", tool, self._proc.pid, self.database)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_option_file()
        try:
            if self._proc is not None and not self._finished:
                if self._proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                    logger.debug("killed %s for database %r early", self._tool, self.database)
                await self._reap()
        finally:
            self._close_stdout()

    def pipe_reader(self) -> PipeReader:
        """The reader of the tool's stdout, for one worker thread at a time.

        Whoever reads through it reports the bytes with :meth:`note_read` and, at the
        end of the pipe, awaits :meth:`finish`; it must stop reading before the context
        is left (the descriptor is closed then).
        """
        if self._stdout is None:
            raise RuntimeError(f"{type(self).__name__} must be entered with 'async with' first")
        return self._stdout

    def note_read(self, count: int) -> None:
        """Account for ``count`` bytes read from stdout by the consumer."""
        if count and not self.bytes_read:
            # The tool reads its options before it prints a byte: the file can go now,
            # so even a crash of this process later leaves no credentials behind.
            self._remove_option_file()
        self.bytes_read += count

    async def _collect_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while data := await self._proc.stderr.read(STDERR_LIMIT):
            self._stderr += data
            if len(self._stderr) > STDERR_LIMIT:
                del self._stderr[:-STDERR_LIMIT]

    async def finish(self) -> None:
        """stdout is at its end: wait for the exit status and judge it.

        Raises:
            DumpError: the tool failed (exit status, signal), with its stderr's tail.
        """
        assert self._proc is not None and self._stderr_task is not None
        await self._stderr_task
        returncode = await self._proc.wait()
        self._finished = True
        self._remove_option_file()
        if returncode != 0:
            raise self._failure(returncode)
        logger.debug(
            "%s finished database %r: %d bytes", self._tool, self.database, self.bytes_read
        )

    async def _reap(self) -> None:
        """Collect stderr and the exit status of a killed (or finished) tool."""
        assert self._proc is not None
        try:
            async with asyncio.timeout(_REAP_TIMEOUT):
                if self._stderr_task is not None:
                    await self._stderr_task
                await self._proc.wait()
        except TimeoutError:
            logger.warning("%s (pid %d) did not exit after SIGKILL", self._tool, self._proc.pid)
        finally:
            self._finished = True
            if self._stderr_task is not None and not self._stderr_task.done():
                self._stderr_task.cancel()

    def _close_stdout(self) -> None:
        """Stop the reader, then close the pipe.

        Its reader has stopped reading by now (the pump waits for its thread on every
        way out); stopping it again makes sure no later read touches a closed descriptor.
        """
        if self._stdout is None:
            return
        reader, self._stdout = self._stdout, None
        reader.stop()
        os.close(reader.fd)

    def _failure(self, returncode: int) -> DumpError:
        name = Path(self._tool or "dump tool").name
        if returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"was killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode}"
        stderr = self.stderr
        lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
        tail = " | ".join(lines[-_STDERR_LINES_IN_MESSAGE:])
        message = f"{name} {how} dumping database {self.database!r} from {self.params.endpoint}"
        if tail:
            message += f": {tail}"
        return DumpError(scrub(message, self.params.password), returncode=returncode, stderr=stderr)

    def _remove_option_file(self) -> None:
        if self._option_file is not None:
            stack, self._option_file = self._option_file, None
            stack.close()
