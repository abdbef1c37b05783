"""Logging for both programs: `<log dir>/<yyyymmdd>.log`, syslog, and safe text.

Every record is written with its control characters escaped, because database names,
reasons and messages can come from a peer: a name holding a newline must not forge a
second log line, nor an escape sequence repaint the administrator's terminal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

from common.errors import ConfigError
from common.text import escape_control

DEFAULT_LOG_DIR = Path("/var/log/backhaul")
FORMAT = "%(asctime)s %(program)s[%(process)d] %(levelname)s %(name)s: %(message)s"


class SafeFormatter(logging.Formatter):
    """A formatter whose output is one line with control characters escaped."""

    def __init__(self, program: str, fmt: str = FORMAT) -> None:
        super().__init__(fmt, datefmt="%Y-%m-%dT%H:%M:%S%z")
        self._program = program

    def format(self, record: logging.LogRecord) -> str:
        record.program = self._program
        message = super().format(record)
        # Call sites escape untrusted arguments themselves; this pass only guarantees one
        # line and nothing invisible, and must not double the backslashes of their escapes.
        return escape_control(message, backslash=False)


class DailyFileHandler(logging.Handler):
    """Appends to `<dir>/<yyyymmdd>.log`, switching file when the local date changes."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self._day = ""
        self._stream: logging.StreamHandler | None = None  # type: ignore[type-arg]

    def path_for(self, when: float) -> Path:
        return self.directory / (time.strftime("%Y%m%d", time.localtime(when)) + ".log")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y%m%d", time.localtime(record.created))
            if day != self._day or self._stream is None:
                self._open(day)
            assert self._stream is not None
            self._stream.stream.write(self.format(record) + "\n")
            self._stream.stream.flush()
        except Exception:  # logging must never take the program down
            self.handleError(record)

    def _open(self, day: str) -> None:
        if self._stream is not None:
            self._stream.stream.close()
        path = self.directory / f"{day}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._stream = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
        self._day = day

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stream.close()
            self._stream = None
        super().close()


def setup_logging(
    program: str,
    log_dir: Path,
    *,
    level: int = logging.INFO,
    use_syslog: bool = True,
    stderr_level: int | None = None,
) -> None:
    """Configure the root logger for ``program`` ("backhaul-agent", ...).

    Raises:
        ConfigError: the log folder cannot be created or written.
    """
    try:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        probe = DailyFileHandler(log_dir)
        probe.path_for(time.time()).touch(mode=0o640, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"log folder {log_dir} is not writable: {exc.strerror}") from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "backhaul", False):  # leave handlers others installed
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    # asyncssh narrates every channel at INFO; its warnings and errors are what matter.
    logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))
    probe.setFormatter(SafeFormatter(program))
    _install(root, probe)
    if use_syslog and Path("/dev/log").exists():
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.setFormatter(SafeFormatter(program, f"{program}[%(process)d]: %(message)s"))
        _install(root, syslog)
    if stderr_level is not None:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(stderr_level)
        console.setFormatter(SafeFormatter(program, "%(program)s: %(message)s"))
        _install(root, console)


def _install(root: logging.Logger, handler: logging.Handler) -> None:
    handler.backhaul = True  # type: ignore[attr-defined]
    root.addHandler(handler)
