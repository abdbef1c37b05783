"""The life of a server process the integration tests start: spawned with its output in a
log file, waited on until a probe answers (or it dies), stopped politely, or killed."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def spawn(argv: Sequence[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log`` and no stdin."""
    with log.open("ab") as output:
        return subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
        )


def wait_ready(
    process: subprocess.Popen[bytes],
    probe: Callable[[], bool],
    timeout: float,
    pause: float = 0.0,
) -> bool:
    """True once ``probe`` answers True; False as soon as the process has ended (a server
    that failed to bind never answers) or when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if probe():
            return True
        time.sleep(pause)
    return False


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait ``timeout`` seconds for a clean exit, then SIGKILL; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL at once, as a crash would end it, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()
