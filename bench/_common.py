"""What the benchmark scripts share: /proc readers, timed children, configs, machine facts.

``core_path.py`` and ``mongo_dump.py`` import this module by its bare name: run as
``python bench/<script>.py`` this folder is first on ``sys.path``, and each script puts
it there itself when it is imported by path from elsewhere. Only the standard library
is imported at module level, because the pipeline child whose memory ``mongo_dump.py``
measures imports this module too.

Memory figures are kiB as /proc and ``wait4`` give them; ``mib`` converts for reports.
Linux only: the readers parse ``/proc/<pid>/status`` and ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"
HOST = "127.0.0.1"
POLL = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A prerequisite is missing or a step failed; the message says which."""


# -- small helpers ------------------------------------------------------------------------


def log(message: str) -> None:
    """One progress line on stderr, stamped with the local time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when it is unknown."""
    return "-" if value is None else format(value, spec)


# -- /proc readers ------------------------------------------------------------------------


def read_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (None once the process is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, owner only)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own user+system seconds, reaped children's user+system seconds) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = text.rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return own, children


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_no_children(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` has reaped all its children (their CPU then counts in cutime)."""
    deadline = time.monotonic() + timeout
    while child_pids(pid) and time.monotonic() < deadline:
        time.sleep(POLL)


# -- processes ----------------------------------------------------------------------------


@dataclass
class Timed:
    """One finished child: wall time, exit status, CPU and peak-memory figures."""

    seconds: float
    returncode: int
    cpu_s: float  # user + system of the child and everything it reaped
    ru_maxrss_kib: int
    hwm_kib: int | None  # last VmHWM sampled from /proc before exit
    child_hwm_kib: dict[str, int] = field(default_factory=dict)  # VmHWM of its children


def spawn_and_time(
    cmd: list[str],
    *,
    env: dict[str, str] | None,
    stdout: IO[bytes],
    stderr: IO[bytes],
    sample_children: bool = False,
) -> Timed:
    """Run ``cmd`` to its end, polling its VmHWM (and, if asked, its children's) meanwhile.

    The children are sampled every tenth poll, as walking /proc costs more than one read.
    """
    children: dict[int, tuple[str, int]] = {}
    hwm: int | None = None
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
    polls = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            seconds = time.perf_counter() - start
            break
        value = read_status_kib(proc.pid, "VmHWM")
        if value is not None:
            hwm = value
        if sample_children and polls % 10 == 0:
            _sample_children(proc.pid, children)
        polls += 1
        time.sleep(POLL)
    proc.returncode = os.waitstatus_to_exitcode(status)
    per_name: dict[str, int] = {}
    for name, value in children.values():
        per_name[name] = max(per_name.get(name, 0), value)
    return Timed(
        seconds, proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, hwm, per_name
    )


def _sample_children(pid: int, seen: dict[int, tuple[str, int]]) -> None:
    for child in child_pids(pid):
        value = read_status_kib(child, "VmHWM")
        if value is None:
            continue
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
        except OSError:
            continue
        seen[child] = (name, max(value, seen.get(child, (name, 0))[1]))


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on ``HOST`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_ssh_banner(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0
) -> None:
    """Wait until ``port`` answers with an SSH banner; fail early if ``proc`` died.

    Raises:
        BenchError: ``proc`` exited, or no banner came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer on {HOST}:{port} within {timeout:.0f} s")


# -- a loopback collector and its agent ----------------------------------------------------


def collector_toml(
    *, port: int, host_key: Path, store: Path, log_dir: Path, agent: str, agent_key: Path
) -> str:
    """collector.toml for a collector on ``HOST``:``port`` that accepts the one ``agent``.

    ``agent_key`` is the agent's private key; the collector is given its ``.pub``.
    """
    return textwrap.dedent(f"""\
        [server]
        listen = "{HOST}:{port}"
        host_key = "{host_key}"

        [storage]
        root = "{store}"
        timezone = "UTC"

        [log]
        dir = "{log_dir}"
        syslog = false

        [[agents]]
        name = "{agent}"
        public_key = "{agent_key}.pub"
        """)


def agent_toml(*, port: int, host_key: Path, client_key: Path, log_dir: Path, agent: str) -> str:
    """agent.toml without its [[sources]] tables, for ``agent`` of that collector.

    ``host_key`` is the collector's private key; the agent is given its ``.pub``. Its
    state and lock folders sit beside ``log_dir``, off the host's /var/lib and /run.
    """
    return textwrap.dedent(f"""\
        [agent]
        name = "{agent}"
        state_dir = "{log_dir.parent / 'agent-state'}"
        run_dir = "{log_dir.parent / 'agent-run'}"

        [collector]
        address = "{HOST}:{port}"
        host_key = "{host_key}.pub"
        client_key = "{client_key}"
        connect_timeout = 10

        [log]
        dir = "{log_dir}"
        syslog = false
        """)


# -- the machine and the source under test ------------------------------------------------


def tool_version(cmd: list[str]) -> str:
    """The first line a ``--version`` style command prints, or why there is none."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(
    load_before: tuple[float, float, float], versions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """CPUs, platform, Python, ``versions`` (name -> version) and the load around a run."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **(versions or {}),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def source_revision() -> dict[str, Any]:
    """The commit under test and the files that differ from it (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(REPO), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            return ""
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    changed = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if not line[3:].startswith("bench/")
    ]
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "changed_files": changed,
        "code_fingerprint": code_fingerprint(),
    }


def balanced_order(order: list[str], round_no: int) -> list[str]:
    """The methods of round ``round_no`` (from 1), in a balanced Latin square.

    In a fixed order each method always follows the same one, and what that one leaves
    behind (a disk still writing, caches filled or emptied) weighs on it alone; turning
    the order round by round does not help, the neighbours stay the same. Williams'
    design does: over ``len(order)`` rounds (twice that for an odd count) every method
    runs once in each position and follows every other method equally often.
    """
    n = len(order)
    if n < 2:
        return list(order)
    first, low, high = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rounds = [[(i + shift) % n for i in first] for shift in range(n)]
    if n % 2:
        rounds += [row[::-1] for row in rounds]
    return [order[i] for i in rounds[(round_no - 1) % len(rounds)]]


def compile_sources() -> None:
    """Byte-compile the package as ``pip install`` does when it installs it.

    A checkout imported with PYTHONDONTWRITEBYTECODE set (some shells and containers set
    it) never gets its .pyc files, and each start of a command then compiles every module
    it imports, about 30 ms of the agent's start here; no installed Backhaul pays that.
    """
    for package in ("agent", "collector", "common"):
        if not compileall.compile_dir(REPO / package, quiet=1):
            raise BenchError(f"byte-compiling {package}/ failed: run compileall on it for why")


def code_fingerprint() -> str:
    """Names, sizes and mtimes of the package's sources: changes if anyone edits them."""
    entries = []
    for package in ("agent", "collector", "common"):
        for path in sorted((REPO / package).rglob("*.py")):
            with contextlib.suppress(OSError):
                stat = path.stat()
                entries.append(f"{path.relative_to(REPO)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
