#!/usr/bin/env python3
"""Core-path benchmark: Backhaul end to end against the shell commands it replaces.

One run starts a throwaway MariaDB on loopback, fills one database with about
``--size-gb`` GB of realistic rows, starts a real collector (``backhaul-collector
serve``) and a loopback ``sshd`` for the baselines, then times, round by round, each
round in the next order of a balanced Latin square (``balanced_order``)::

    A  backhaul-agent backup --config agent.toml --database DB   (to the collector)
    B  mariadb-dump ... DB | zstd -3 | ssh host 'cat > file'      (streaming pipe)
    C  mariadb-dump ... DB > f.sql; tar czf f.tgz f.sql; scp ...  (script style)
    D  mariadb-dump ... DB > /dev/null                            (the floor)
    E  backhaul-agent with extra [[sources]] keys (only with --variant)

Every method uses the same dump options as the agent and the same credentials, given
through a ``--defaults-extra-file``. Both sides share the machine at equal priority;
``--receiver-nice N`` runs the receiving side of every method (the collector; sshd and
the processes it forks) at niceness N instead, so that it stands for another machine and
gets what the sending side leaves idle rather than competing with the dump.
Peak RSS of the agent is sampled from ``/proc/<pid>/status`` (VmHWM) until it exits and
cross-checked with ``wait4``'s ``ru_maxrss``; the collector's VmHWM is reset before each
backup and read after it.

Usage::

    python bench/core_path.py --size-gb 1 --repeat 3
    python bench/core_path.py --size-gb 0.2 --repeat 1      # a quick run
    python bench/core_path.py --variant 'record_checksums = false'   # adds method E

Needs mariadb-server, zstd, openssh-client and openssh-server (only ``sshd`` is used;
it is started on a free loopback port with its own configuration, never as a service).
Results go to stdout and to ``bench/out/core_path-<time>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

# Run as a script, this folder is already on sys.path; imported by path, it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    HOST,
    OUT_DIR,
    REPO,
    BenchError,
    agent_toml,
    balanced_order,
    collector_toml,
    compile_sources,
    fmt,
    free_port,
    log,
    machine_info,
    median,
    mib,
    proc_cpu,
    read_status_kib,
    reset_peak_rss,
    source_revision,
    spawn_and_time,
    stop_process,
    tool_version,
    wait_for_ssh_banner,
    wait_no_children,
)

AGENT_NAME = "bench"
SOURCE_NAME = "main"
SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)

METHODS = {
    "A": "backhaul (agent -> collector)",
    "B": "pipe (dump | zstd -3 | ssh cat)",
    "C": "script (dump > f; tar czf; scp)",
    "D": "floor (dump > /dev/null)",
    "E": "backhaul variant",
}
BACKHAUL_METHODS = ("A", "E")
TARGET_PIPE_RATIO = 1.0
TARGET_AGENT_RSS_MIB = 80.0


def niced(command: list[str], nice: int) -> list[str]:
    """``command`` run at niceness ``nice`` (threads and children inherit it)."""
    return ["nice", "-n", str(nice), *command] if nice else command


def method_label(method: str, variant: list[str]) -> str:
    if method == "E":
        return f"{METHODS['E']} ({'; '.join(v.strip() for v in variant)})"
    return METHODS[method]


# -- small helpers ------------------------------------------------------------------------


def load_helpers() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The integration-test helpers: harness, mariadb_server, sample_data."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.integration import harness, mariadb_server, sample_data

    return harness, mariadb_server, sample_data


def console_script(name: str, module: str) -> list[str]:
    """The installed script beside this interpreter, as a real install runs it.

    Not the first one on PATH: that may be a version manager's shim (pyenv's costs a
    tenth of a second of bash per start), which is no part of Backhaul.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", module]


def agent_backup(config: Path, database: str) -> list[str]:
    """``backhaul-agent backup`` of one database, as every Backhaul method runs it."""
    return [*console_script("backhaul-agent", "agent.cli"), "backup", "--config",
            str(config), "--database", database]


# -- the processes under test ---------------------------------------------------------------


class Sshd:
    """A loopback sshd for the baselines, run in the foreground as the current user."""

    def __init__(self, root: Path, keygen: Any, client_pub: Path, nice: int) -> None:
        self.root = root
        self.nice = nice
        self.port = free_port()
        self.binary = shutil.which("sshd", path=SBIN_PATH)
        if self.binary is None:
            raise BenchError(
                "sshd not found: the baselines need a loopback SSH server; install it with "
                "`apt-get install openssh-server` (it is only started by this benchmark, on a "
                "free loopback port, with its own configuration)"
            )
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            # sshd running as root insists on its privilege-separation directory.
            try:
                Path("/run/sshd").mkdir(mode=0o755)
            except OSError as exc:
                raise BenchError(f"sshd needs /run/sshd and it cannot be created: {exc}") \
                    from None
        self.host_key = keygen(root / "ssh_host_ed25519_key", "bench-sshd")
        self.authorized_keys = root / "authorized_keys"
        shutil.copyfile(client_pub, self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.config = root / "sshd_config"
        self.config.write_text(textwrap.dedent(f"""\
            Port {self.port}
            ListenAddress {HOST}
            HostKey {self.host_key}
            PidFile {root / "sshd.pid"}
            AuthorizedKeysFile {self.authorized_keys}
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            StrictModes no
            UsePAM no
            UseDNS no
            PrintMotd no
            PrintLastLog no
            Subsystem sftp internal-sftp
            LogLevel ERROR
            """))
        self.known_hosts = root / "known_hosts"
        key_type, key_b64 = (self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {key_type} {key_b64}\n")
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.binary is not None
        check = subprocess.run([self.binary, "-t", "-f", str(self.config)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise BenchError(f"sshd refused its test configuration: {check.stderr.strip()}")
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                niced([self.binary, "-D", "-e", "-f", str(self.config)], self.nice),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        wait_for_ssh_banner(self.port, self.proc, "sshd")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


# -- the benchmark ----------------------------------------------------------------------


@dataclass
class Run:
    method: str
    round: int
    seconds: float
    cpu_local_s: float
    cpu_server_side_s: float
    cpu_mariadbd_s: float
    compressed_bytes: int | None = None
    sql_bytes: int | None = None
    agent_hwm_kib: int | None = None
    agent_ru_maxrss_kib: int | None = None
    dump_tool_hwm_kib: int | None = None
    collector_hwm_kib: int | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.harness, mariadb_server, self.sample_data = load_helpers()
        self.mariadb_server = mariadb_server
        self.tmp = Path(tempfile.mkdtemp(prefix="backhaul-bench-"))
        self.database = args.database
        self.user = getpass.getuser()
        self.server: Any = None
        self.sshd: Sshd | None = None
        self.collector: subprocess.Popen[bytes] | None = None
        self.runs: list[Run] = []
        self.dataset: dict[str, Any] = {}
        self.collector_idle_kib: int | None = None
        self.collector_hwm_reset = False
        self.source_before: dict[str, Any] = {}

    # -- setup ------------------------------------------------------------------------

    def check_tools(self) -> None:
        missing = [t for t in ("mariadb-dump", "zstd", "ssh", "scp", "tar", "gzip", "bash",
                               "ssh-keygen") if shutil.which(t) is None]
        if missing:
            raise BenchError(
                f"missing tools: {', '.join(missing)} (Debian: mariadb-client zstd "
                "openssh-client tar gzip)"
            )

    def start_mariadb(self) -> None:
        log("starting a throwaway MariaDB on loopback")
        try:
            self.server = self.mariadb_server.MariaDBServer()
        except self.mariadb_server.MariaDBNotInstalled as exc:
            raise BenchError(str(exc)) from None
        self.server.start()
        target = int(self.args.size_gb * 1e9)
        log(f"filling `{self.database}` with about {target / 1e9:.2f} GB of rows "
            "(roughly 35 s per GB)")
        started = time.monotonic()
        rows = self.sample_data.generate_bulk(self.server, self.database, target)
        self.dataset = {"database": self.database, "rows": rows, "target_bytes": target,
                        "generate_seconds": round(time.monotonic() - started, 1)}
        self.password_file = self.tmp / "mysql.pass"
        self.password_file.write_text(self.server.root_password + "\n")
        self.password_file.chmod(0o600)
        self.mysql_cnf = self.tmp / "client.cnf"
        from agent.engines.mysql_connect import MySQLParams
        from agent.engines.mysql_dump import option_file_text

        params = MySQLParams(HOST, self.server.port, None, self.server.root_user,
                             self.server.root_password)
        fd = os.open(self.mysql_cnf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(option_file_text(params))

    def dump_command(self) -> list[str]:
        """The dump tool with exactly the agent's arguments, credentials from a file."""
        from agent.engines.mysql_dump import dump_arguments, find_dump_tool

        return [find_dump_tool(), *dump_arguments(self.mysql_cnf, self.database)]

    def start_collector(self) -> None:
        keygen = self.harness.ssh_keygen
        keys = self.tmp / "keys"
        keys.mkdir()
        self.host_key = keygen(keys / "collector_host_key", "bench-collector")
        self.agent_key = keygen(keys / f"agent_{AGENT_NAME}", "bench-agent")
        self.store = self.tmp / "store"
        self.collector_port = free_port()
        self.collector_config = self.tmp / "collector.toml"
        self.collector_config.write_text(collector_toml(
            port=self.collector_port, host_key=self.host_key, store=self.store,
            log_dir=self.tmp / "collector-logs", agent=AGENT_NAME, agent_key=self.agent_key,
        ))
        self.agent_config = self.write_agent_config(self.tmp / "agent.toml", [])
        self.variant_config = self.write_agent_config(self.tmp / "agent-variant.toml",
                                                      self.args.variant)
        log(f"starting backhaul-collector on {HOST}:{self.collector_port}")
        self.collector_log = self.tmp / "collector.stderr"
        with self.collector_log.open("wb") as err:
            self.collector = subprocess.Popen(
                niced([*console_script("backhaul-collector", "collector.cli"), "serve",
                       "--config", str(self.collector_config)], self.args.receiver_nice),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        try:
            wait_for_ssh_banner(self.collector_port, self.collector, "backhaul-collector")
        except BenchError as exc:
            raise BenchError(f"{exc}: {self.collector_log.read_text()[-2000:]}") from None
        self.collector_idle_kib = read_status_kib(self.collector.pid, "VmRSS")
        check = subprocess.run(
            [*console_script("backhaul-agent", "agent.cli"), "check-config", "--config",
             str(self.variant_config)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise BenchError(f"--variant gives an invalid agent.toml: {check.stderr.strip()}")

    def write_agent_config(self, path: Path, extra_lines: list[str]) -> Path:
        """agent.toml for the bench agent; ``extra_lines`` go into its [[sources]] table."""
        extra = "".join(line.strip() + "\n" for line in extra_lines)
        source = self.harness.mysql_source(
            self.server.port, json.dumps([self.database]), password_file=self.password_file,
            name=SOURCE_NAME, user=self.server.root_user, extra=extra,
        )
        head = agent_toml(port=self.collector_port, host_key=self.host_key,
                          client_key=self.agent_key, log_dir=self.tmp / "agent-logs",
                          agent=AGENT_NAME)
        path.write_text(head + source)
        return path

    def start_sshd(self) -> None:
        (self.tmp / "sshd").mkdir(exist_ok=True)
        self.sshd = Sshd(self.tmp / "sshd", self.harness.ssh_keygen,
                         self.agent_key.with_suffix(".pub"), self.args.receiver_nice)
        log(f"starting sshd on {HOST}:{self.sshd.port}")
        self.sshd.start()
        self.remote = self.tmp / "remote"
        self.remote.mkdir()
        self.work = self.tmp / "work"
        self.work.mkdir()
        check = subprocess.run([*self.ssh_command(), "true"], capture_output=True, text=True,
                               timeout=30, check=False)
        if check.returncode != 0:
            raise BenchError(f"ssh to the bench sshd failed: {check.stderr.strip()}")

    def _ssh_options(self) -> list[str]:
        assert self.sshd is not None
        return ["-F", "/dev/null", "-i", str(self.agent_key), "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.sshd.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "LogLevel=ERROR"]

    def ssh_command(self) -> list[str]:
        assert self.sshd is not None
        return ["ssh", *self._ssh_options(), "-p", str(self.sshd.port), f"{self.user}@{HOST}"]

    def measure_dump_size(self) -> None:
        """One untimed dump: warms the page cache and measures the SQL size."""
        log("warm-up dump (untimed) to measure the SQL size")
        proc = subprocess.Popen(self.dump_command(), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        if proc.wait() != 0:
            raise BenchError(f"warm-up dump failed with status {proc.returncode}")
        self.dataset["sql_bytes"] = total
        log(f"SQL dump is {total / 1e9:.3f} GB ({total:,} bytes), {self.dataset['rows']:,} rows")

    # -- the methods --------------------------------------------------------------------

    def _shell(self, script: str) -> list[str]:
        return ["bash", "-e", "-o", "pipefail", "-c", script]

    def _cpu_around(self) -> tuple[float, float]:
        mariadbd = proc_cpu(self.server.pid)[0] if self.server.pid else 0.0
        sshd = proc_cpu(self.sshd.pid)[1] if self.sshd else 0.0
        return mariadbd, sshd

    def run_method(self, method: str, round_no: int) -> Run:
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        out, err = logs / f"{method}{round_no}.out", logs / f"{method}{round_no}.err"
        mariadbd_before, sshd_before = self._cpu_around()
        collector_before = 0.0
        if method in BACKHAUL_METHODS:
            assert self.collector is not None
            self.collector_hwm_reset = reset_peak_rss(self.collector.pid)
            collector_before = proc_cpu(self.collector.pid)[0]
            config = self.agent_config if method == "A" else self.variant_config
            cmd = agent_backup(config, self.database)
        else:
            cmd = self._shell(self._baseline_script(method))
        with out.open("wb") as out_fh, err.open("wb") as err_fh:
            timed = spawn_and_time(cmd, env=None, stdout=out_fh, stderr=err_fh,
                                   sample_children=True)
        if timed.returncode != 0:
            raise BenchError(f"method {method} ({METHODS[method]}) exited with status "
                             f"{timed.returncode}: {err.read_text()[-2000:].strip()}")
        if method in "BC" and self.sshd is not None:
            wait_no_children(self.sshd.pid)
        mariadbd_after, sshd_after = self._cpu_around()
        run = Run(method, round_no, timed.seconds, timed.cpu_s, 0.0,
                  mariadbd_after - mariadbd_before,
                  dump_tool_hwm_kib=timed.child_hwm_kib.get("mariadb-dump"))
        if method in BACKHAUL_METHODS:
            assert self.collector is not None
            run.cpu_server_side_s = proc_cpu(self.collector.pid)[0] - collector_before
            run.collector_hwm_kib = read_status_kib(self.collector.pid, "VmHWM")
            run.agent_hwm_kib = timed.hwm_kib
            run.agent_ru_maxrss_kib = timed.ru_maxrss_kib
            run.compressed_bytes, run.sql_bytes = self._check_stored()
        elif method in "BC":
            run.cpu_server_side_s = sshd_after - sshd_before
            run.compressed_bytes = self._remote_size(method)
        self._clean_outputs()
        return run

    def _baseline_script(self, method: str) -> str:
        dump = shlex.join(self.dump_command())
        if method == "B":
            remote_cmd = f"cat > {shlex.quote(str(self.remote / 'db.sql.zst'))}"
            return f"{dump} | zstd -q -3 -c | {shlex.join(self.ssh_command())} " \
                   f"{shlex.quote(remote_cmd)}"
        if method == "C":
            assert self.sshd is not None
            sql, tgz = self.work / "db.sql", self.work / "db.tgz"
            scp = ["scp", "-q", *self._ssh_options(), "-P", str(self.sshd.port), str(tgz),
                   f"{self.user}@{HOST}:{self.remote / 'db.tgz'}"]
            return (f"{dump} > {shlex.quote(str(sql))}\n"
                    f"tar czf {shlex.quote(str(tgz))} -C {shlex.quote(str(self.work))} db.sql\n"
                    f"{shlex.join(scp)}")
        return f"{dump} > /dev/null"

    def _remote_size(self, method: str) -> int:
        path = self.remote / ("db.sql.zst" if method == "B" else "db.tgz")
        if not path.is_file():
            raise BenchError(f"method {method} left no file at {path}")
        return path.stat().st_size

    def _check_stored(self) -> tuple[int, int]:
        folder = self.store / AGENT_NAME / self.database
        backups = sorted(folder.glob("*.sql.zst"))
        if len(backups) != 1:
            raise BenchError(f"expected one stored backup in {folder}, found {backups}")
        backup = backups[0]
        manifest = json.loads(Path(f"{backup}.manifest.json").read_text())
        if manifest.get("verified") is not True:
            raise BenchError(f"collector manifest of {backup.name} does not say verified")
        if manifest.get("size") != backup.stat().st_size:
            raise BenchError(f"stored size of {backup.name} differs from its manifest")
        return int(manifest["size"]), int(manifest["verification"]["uncompressed_bytes"])

    def _clean_outputs(self) -> None:
        for folder in (self.remote, self.work, self.store / AGENT_NAME / self.database):
            if folder.is_dir():
                for entry in folder.iterdir():
                    entry.unlink()

    # -- orchestration ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.check_tools()
        compile_sources()
        self.start_mariadb()
        self.start_collector()
        self.start_sshd()
        self.measure_dump_size()
        order = [m for m in METHODS if m in self.args.methods]
        self.source_before = source_revision()
        load_before = os.getloadavg()
        started = time.monotonic()
        for round_no in range(1, self.args.repeat + 1):
            for method in balanced_order(order, round_no):
                label = method_label(method, self.args.variant)
                log(f"round {round_no}/{self.args.repeat}: {method} {label}")
                run = self.run_method(method, round_no)
                self.runs.append(run)
                extra = ""
                if run.agent_hwm_kib is not None:
                    extra = (f", agent VmHWM {mib(run.agent_hwm_kib):.1f} MiB, collector "
                             f"VmHWM {mib(run.collector_hwm_kib) or 0:.1f} MiB")
                log(f"  {run.seconds:.2f} s (local CPU {run.cpu_local_s:.1f} s, server side "
                    f"{run.cpu_server_side_s:.1f} s{extra})")
        profile = self.profile() if self.args.profile else None
        return self.result(load_before, time.monotonic() - started, profile)

    def profile(self) -> dict[str, Any]:
        """One extra, untimed backup with py-spy on the agent and the collector."""
        assert self.collector is not None
        agent_cmd = agent_backup(self.agent_config, self.database)
        try:
            return profile_backup("core_path", self.collector.pid, agent_cmd, self.tmp)
        finally:
            self._clean_outputs()

    def result(self, load_before: tuple[float, float, float], elapsed: float,
               profile: dict[str, Any] | None) -> dict[str, Any]:
        by_method: dict[str, list[Run]] = {}
        for run in self.runs:
            by_method.setdefault(run.method, []).append(run)
        sql_bytes = self.dataset["sql_bytes"]
        summary: dict[str, Any] = {}
        for method in (m for m in METHODS if m in by_method):  # A, B, C, D whatever ran first
            runs = by_method[method]
            secs = [r.seconds for r in runs]
            compressed = [r.compressed_bytes for r in runs if r.compressed_bytes is not None]
            summary[method] = {
                "label": method_label(method, self.args.variant),
                "median_s": median(secs), "min_s": min(secs), "max_s": max(secs),
                "sql_mb_per_s": sql_bytes / 1e6 / statistics.median(secs),
                "compressed_bytes": median([float(c) for c in compressed]),
                "cpu_local_s": median([r.cpu_local_s for r in runs]),
                "cpu_server_side_s": median([r.cpu_server_side_s for r in runs]),
                "cpu_mariadbd_s": median([r.cpu_mariadbd_s for r in runs]),
            }
        ratios = {}
        for mine, prefix in (("A", "backhaul"), ("E", "variant")):
            for other, suffix in (("B", "pipe"), ("C", "script"), ("D", "floor")):
                if mine in summary and other in summary:
                    ratios[f"{prefix}_over_{suffix}"] = (
                        summary[mine]["median_s"] / summary[other]["median_s"])
        memory: dict[str, Any] = {
            "collector_hwm_reset_per_backup": self.collector_hwm_reset,
            "collector_idle_rss_mib": mib(self.collector_idle_kib),
        }
        for method in BACKHAUL_METHODS:
            runs = by_method.get(method, [])
            if runs:
                memory[method] = {
                    "agent_hwm_mib": [mib(r.agent_hwm_kib) for r in runs],
                    "agent_ru_maxrss_mib": [mib(r.agent_ru_maxrss_kib) for r in runs],
                    "dump_tool_hwm_mib": [mib(r.dump_tool_hwm_kib) for r in runs],
                    "collector_hwm_mib": [mib(r.collector_hwm_kib) for r in runs],
                }
        agent_peak = max((v for v in memory.get("A", {}).get("agent_hwm_mib", [])
                          if v is not None), default=None)
        targets = []
        if "backhaul_over_pipe" in ratios:
            value = ratios["backhaul_over_pipe"]
            targets.append({"name": "Backhaul/pipe ratio", "value": value,
                            "limit": f"<= {TARGET_PIPE_RATIO}",
                            "pass": value <= TARGET_PIPE_RATIO})
        if agent_peak is not None:
            targets.append({"name": "agent peak RSS (MiB, max over runs)", "value": agent_peak,
                            "limit": f"< {TARGET_AGENT_RSS_MIB}",
                            "pass": agent_peak < TARGET_AGENT_RSS_MIB})
        return {
            "benchmark": "core_path",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "args": {"size_gb": self.args.size_gb, "repeat": self.args.repeat,
                     "methods": self.args.methods, "variant": self.args.variant,
                     "receiver_nice": self.args.receiver_nice},
            "labels": {m: method_label(m, self.args.variant) for m in self.args.methods},
            "machine": {**machine_info(load_before, tool_versions()),
                        "source": source_revision()},
            "source_at_start": self.source_before,
            "dataset": self.dataset,
            "elapsed_timed_s": round(elapsed, 1),
            "summary": summary,
            "ratios": ratios,
            "memory": memory,
            "targets": targets,
            "profile": profile,
            "runs": [asdict(r) for r in self.runs],
        }

    def close(self) -> None:
        stop_process(self.collector)
        if self.sshd is not None:
            self.sshd.stop()
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.close()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def profile_backup(bench: str, collector_pid: int, agent_cmd: list[str],
                   tmp: Path) -> dict[str, Any]:
    """Run ``agent_cmd`` (one backup) under py-spy, with py-spy on the collector too;
    print and return where the busy samples went."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    files = {who: OUT_DIR / f"{bench}-{stamp}-{who}.txt" for who in ("agent", "collector")}
    log("profiling one extra backup with py-spy (collapsed stacks, speedscope can open them)")
    common = ["record", "--format", "raw", "--rate", "250", "--threads"]
    with open(tmp / "py-spy-collector.log", "wb") as spy_log:
        watcher = subprocess.Popen(
            [spy, *common, "--output", str(files["collector"]), "--pid", str(collector_pid)],
            stdout=spy_log, stderr=spy_log,
        )
    time.sleep(1.0)
    with (tmp / "py-spy-agent.out").open("wb") as out, \
            (tmp / "py-spy-agent.err").open("wb") as err:
        timed = spawn_and_time(
            [spy, *common, "--output", str(files["agent"]), "--", *agent_cmd], env=None,
            stdout=out, stderr=err, sample_children=True,
        )
    watcher.send_signal(signal.SIGINT)
    try:
        watcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        watcher.kill()
        watcher.wait()
    summary = {who: top_frames(path) for who, path in files.items() if path.is_file()}
    for who, ranks in summary.items():
        for kind in ("inclusive", "self"):
            print(f"\npy-spy {who}: share of busy samples, {kind}")
            for line in ranks[kind]:
                print(f"  {line['share']:6.1%}  {line['frame']}")
    return {"seconds_under_profiler": round(timed.seconds, 2),
            "files": {k: str(v) for k, v in files.items()}, "top": summary}


IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py:81)",  # a pool thread waiting for work
    "select (selectors.py",  # the event loop waiting for I/O
    "_do_waitpid (asyncio/unix_events.py",  # the child watcher waiting for the dump
    "wait (threading.py",
)
BOILERPLATE = ("threading.py", "runners.py", "base_events.py", "asyncio/events.py",
               "concurrent/futures/thread.py", "<module>", "<frozen importlib")


def top_frames(path: Path, limit: int = 15) -> dict[str, list[dict[str, Any]]]:
    """Where the busy samples of py-spy's collapsed stacks went.

    Samples whose innermost frame is a wait (idle pool threads, the event loop in
    epoll) are left out. ``self`` ranks innermost frames, ``inclusive`` ranks frames
    anywhere on the stack except asyncio/threading plumbing.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [f for f in stack.split(";")
                  if not f.startswith(("thread (", "process "))]
        if not frames or any(idle in frames[-1] for idle in IDLE_LEAVES):
            continue
        count = int(count_text)
        busy += count
        own[_short_frame(frames[-1])] += count
        for frame in {_short_frame(f) for f in frames if not any(b in f for b in BOILERPLATE)}:
            inclusive[frame] += count
    if not busy:
        return {"self": [], "inclusive": []}

    def rank(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": frame, "samples": n, "share": n / busy}
                for frame, n in counter.most_common(limit)]

    return {"self": rank(own), "inclusive": rank(inclusive)}


def _short_frame(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({module})" if module else name


def tool_versions() -> dict[str, str]:
    """Versions of what the methods run, for the report's machine section."""
    import asyncssh
    import zstandard

    return {
        "asyncssh": asyncssh.__version__,
        "zstandard": zstandard.__version__,
        "mariadb_dump": tool_version(["mariadb-dump", "--version"]),
        "zstd": tool_version(["zstd", "--version"]),
        "ssh": tool_version(["ssh", "-V"]),
    }


# -- report ---------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    data = result["dataset"]
    summary = result["summary"]
    print()
    print(f"core path benchmark: {result['args']['repeat']} round(s), "
          f"{result['machine']['cpus']} CPU(s), load {result['machine']['loadavg_before'][0]:.2f}"
          f" -> {result['machine']['loadavg_after'][0]:.2f}")
    source = result["machine"]["source"]
    if source["code_fingerprint"] != result["source_at_start"]["code_fingerprint"]:
        print("WARNING: the agent/collector sources changed during the run (commit "
              f"{str(result['source_at_start']['commit'])[:12]} -> {str(source['commit'])[:12]});"
              " the rounds mix versions")
    if source["commit"]:
        dirty = f", {len(source['changed_files'])} changed file(s)" if source["changed_files"] \
            else ""
        print(f"source: commit {source['commit'][:12]}{dirty}")
    nice = result["args"]["receiver_nice"]
    print(f"receiving side (collector; sshd and its children) at nice {nice}"
          + (": a stand-in for another machine, it gets what the sending side leaves idle"
             if nice else ", as the sending side: both compete for the same CPUs"))
    print(f"dataset: `{data['database']}`, {data['rows']:,} rows, SQL dump "
          f"{data['sql_bytes'] / 1e9:.3f} GB ({data['sql_bytes']:,} bytes), "
          f"generated in {data['generate_seconds']:.0f} s")
    print()
    header = (f"{'method':<36}{'median s':>9}{'min':>8}{'max':>8}{'SQL MB/s':>10}"
              f"{'out MB':>9}{'CPU local':>11}{'CPU srv':>9}{'CPU db':>8}")
    print(header)
    print("-" * len(header))
    for method, row in summary.items():
        compressed = row["compressed_bytes"]
        label = METHODS[method]
        print(f"{method + ' ' + label:<36}{row['median_s']:>9.2f}{row['min_s']:>8.2f}"
              f"{row['max_s']:>8.2f}{row['sql_mb_per_s']:>10.1f}"
              f"{fmt(None if compressed is None else compressed / 1e6, '.1f'):>9}"
              f"{row['cpu_local_s']:>11.1f}{row['cpu_server_side_s']:>9.1f}"
              f"{row['cpu_mariadbd_s']:>8.1f}")
    print("(medians of CPU seconds: local = the command's own process tree; srv = collector or"
          " sshd side; db = mariadbd)")
    if "E" in summary:
        print(f"E = A with: {'; '.join(result['args']['variant'])}")
    ratios = result["ratios"]
    if ratios:
        print()
        names = {"backhaul": "Backhaul", "variant": "variant E"}
        for prefix in ("backhaul", "variant"):
            parts = [f"{names[prefix]}/{suffix} {ratios[f'{prefix}_over_{suffix}']:.2f}"
                     for suffix in ("pipe", "script", "floor")
                     if f"{prefix}_over_{suffix}" in ratios]
            if parts:
                print("ratios of medians: " + ", ".join(parts))
    memory = result["memory"]

    def stats(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        if not known:
            return "-"
        return f"median {statistics.median(known):.1f} MiB, max {max(known):.1f} MiB"

    scope = "per backup" if memory["collector_hwm_reset_per_backup"] else "since start"
    for method in BACKHAUL_METHODS:
        if method not in memory:
            continue
        mem = memory[method]
        print()
        print(f"{method}: agent peak RSS (VmHWM):        {stats(mem['agent_hwm_mib'])}")
        print(f"{method}: agent wait4 ru_maxrss:         {stats(mem['agent_ru_maxrss_mib'])}"
              " (includes the dump tool if it was larger)")
        print(f"{method}: mariadb-dump peak RSS:         {stats(mem['dump_tool_hwm_mib'])}")
        print(f"{method}: collector peak RSS ({scope}): {stats(mem['collector_hwm_mib'])}; "
              f"idle {fmt(memory['collector_idle_rss_mib'], '.1f')} MiB")
    print()
    for target in result["targets"]:
        verdict = "PASS" if target["pass"] else "FAIL"
        print(f"{verdict}  {target['name']} = {target['value']:.2f} (target {target['limit']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0,
                        help="approximate SQL size of the test database in GB (default 1)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of A,B,C,D; medians are reported (default 3)")
    parser.add_argument("--methods", default="ABCD",
                        help="which methods to time, e.g. AB (default ABCD; E is added by "
                             "--variant)")
    parser.add_argument("--database", default="benchdb", help="database name (default benchdb)")
    parser.add_argument("--variant", action="append", default=[], metavar="TOML_LINE",
                        help="a key for the agent's [[sources]] table, e.g. "
                             "'record_checksums = false' or 'compression_level = 1'; adds "
                             "method E, Backhaul with these keys, timed alongside A "
                             "(repeatable)")
    parser.add_argument("--receiver-nice", type=int, default=0, metavar="N",
                        help="niceness of the receiving side, the collector and sshd, "
                             "as a stand-in for another machine (0 to 19; default 0, "
                             "equal priority with the sending side)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, run one more backup under py-spy")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target fails")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs) for inspection")
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.repeat < 1:
        parser.error("--size-gb must be positive and --repeat at least 1")
    if not 0 <= args.receiver_nice <= 19:
        parser.error("--receiver-nice must be between 0 and 19")
    args.methods = "".join(m for m in METHODS if m in args.methods.upper())
    if args.variant and "E" not in args.methods:
        args.methods += "E"
    if "E" in args.methods and not args.variant:
        parser.error("method E needs at least one --variant")
    if not args.methods:
        parser.error("--methods needs at least one of A, B, C, D (E with --variant)")
    return args


@contextlib.contextmanager
def cleanup_on_signal() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the servers are stopped either way."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        with cleanup_on_signal():
            result = bench.run()
    except BenchError as exc:
        print(f"core_path: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"core_path: interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return 130
    finally:
        bench.close()
    print_report(result)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"core_path-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresult written to {out}")
    if args.check and not all(t["pass"] for t in result["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
