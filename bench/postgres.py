#!/usr/bin/env python3
"""PostgreSQL benchmark: Backhaul end to end against the shell pipe it replaces.

One run starts a throwaway PostgreSQL on loopback (``tests/integration/postgres_server``),
fills one database with about ``--size-gb`` GB of rows (the size of its uncompressed
custom-format dump), starts a real collector and a loopback ``sshd``, then times, round
by round in the balanced order of ``balanced_order``::

    A  backhaul-agent backup --config agent.toml --database DB        (to the collector)
    B  pg_dump -Fc -Z0 DB | zstd -3 | ssh host 'cat > file'           (streaming pipe)
    D  pg_dump -Fc -Z0 DB > /dev/null                                 (the floor)

The baselines run the same ``pg_dump`` with the agent's arguments and the same
credentials (a 0600 passfile). The agent's peak RSS is sampled from ``/proc`` (VmHWM)
and cross-checked with ``wait4``'s ``ru_maxrss``. ``--receiver-nice N`` runs the
receiving side of both (the collector; sshd and what it forks) at niceness N, as in
``core_path.py``: on one machine the receiver otherwise takes CPU from the dump.

Usage::

    python bench/postgres.py --size-gb 1 --repeat 3
    python bench/postgres.py --size-gb 0.1 --repeat 1      # a quick run

Needs postgresql, zstd, openssh-client and openssh-server (only ``sshd``, on a free
loopback port with its own configuration). Results go to stdout and to
``bench/out/postgres-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from core_path import Sshd, agent_backup, console_script, niced, profile_backup

METHODS = {
    "A": "backhaul-agent backup (to a loopback collector)",
    "B": "pg_dump -Fc -Z0 | zstd -3 | ssh 'cat > f'",
    "D": "pg_dump -Fc -Z0 > /dev/null",
}
AGENT_NAME = "bench"
DATABASE = "bench_pg"
TARGET_PIPE_RATIO = 1.0
TARGET_AGENT_RSS_MIB = 80.0
# One batch of rows: a clinic's visits, with text, numbers, a timestamp and some JSON.
ROWS_SQL = """
INSERT INTO visits (patient, ward, seen_at, amount, notes, details)
SELECT 'patient-' || (g % 100000), 'ward ' || (g % 37), timestamptz '2026-01-01'
       + (g || ' seconds')::interval, round((g % 100000) / 7.0, 2),
       md5(g::text) || ' ' || md5((g * 31)::text) || ' follow-up in ' || (g % 30) || ' days',
       jsonb_build_object('bp', 100 + g % 60, 'pulse', 50 + g % 50, 'flag', g % 7 = 0)
FROM generate_series({start}, {stop}) g
"""
BATCH = 200_000
ROW_BYTES = 230  # about one row of the dump, for the row count


def load_helpers() -> tuple[Any, Any]:
    """The integration-test helpers: harness, postgres_server."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.integration import harness, postgres_server

    return harness, postgres_server


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.harness, self.pg = load_helpers()
        self.tmp = Path(tempfile.mkdtemp(prefix="backhaul-bench-pg-"))
        self.server: Any = None
        self.sshd: Sshd | None = None
        self.collector: subprocess.Popen[bytes] | None = None
        self.runs: list[dict[str, Any]] = []
        self.dataset: dict[str, Any] = {}

    def start_postgres(self) -> None:
        log("starting a throwaway PostgreSQL on loopback")
        self.server = self.pg.PostgresServer()
        self.server.start()
        target = int(self.args.size_gb * 1e9)
        rows = max(BATCH, target // ROW_BYTES)
        log(f"filling `{DATABASE}` with {rows:,} rows (about {target / 1e9:.2f} GB of dump)")
        started = time.monotonic()
        self.server.execute("postgres", f"CREATE DATABASE {DATABASE}")
        self.server.execute(DATABASE, "CREATE TABLE visits (id bigint GENERATED ALWAYS AS "
                            "IDENTITY PRIMARY KEY, patient text, ward text, seen_at "
                            "timestamptz, amount numeric(12, 2), notes text, details jsonb)")
        for start in range(1, rows + 1, BATCH):
            self.server.execute(DATABASE, ROWS_SQL.format(start=start,
                                                          stop=min(rows, start + BATCH - 1)))
        self.server.execute(DATABASE, "VACUUM ANALYZE visits")
        self.dataset = {"database": DATABASE, "rows": rows,
                        "generate_seconds": round(time.monotonic() - started, 1)}
        self.password_file = self.tmp / "pg.pass"
        self.password_file.write_text(self.server.password + "\n")
        self.password_file.chmod(0o600)
        from agent.engines.pg_dump import passfile_line
        from agent.engines.pg_inspect import PgParams

        self.params = PgParams(HOST, self.server.port, None, self.server.superuser,
                               self.server.password)
        self.passfile = self.tmp / "pgpass"
        self.passfile.write_text(passfile_line(self.params))
        self.passfile.chmod(0o600)

    def dump_command(self) -> str:
        """pg_dump with the agent's arguments and environment, as a shell fragment."""
        from agent.engines.pg_dump import client_environment, dump_arguments, find_pg_tool

        env = client_environment(self.params, DATABASE, self.passfile)
        args = dump_arguments()
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PATH")
        return f"env {assigns} {shlex.join([find_pg_tool('pg_dump'), *args])}"

    def start_collector(self) -> None:
        keygen = self.harness.ssh_keygen
        keys = self.tmp / "keys"
        keys.mkdir()
        self.host_key = keygen(keys / "collector_host_key", "bench-collector")
        self.agent_key = keygen(keys / f"agent_{AGENT_NAME}", "bench-agent")
        self.store = self.tmp / "store"
        port = free_port()
        config = self.tmp / "collector.toml"
        config.write_text(collector_toml(port=port, host_key=self.host_key, store=self.store,
                                         log_dir=self.tmp / "collector-logs", agent=AGENT_NAME,
                                         agent_key=self.agent_key))
        source = self.harness_source()
        self.agent_config = self.tmp / "agent.toml"
        self.agent_config.write_text(agent_toml(
            port=port, host_key=self.host_key, client_key=self.agent_key,
            log_dir=self.tmp / "agent-logs", agent=AGENT_NAME) + source)
        log(f"starting backhaul-collector on {HOST}:{port}")
        self.collector_log = self.tmp / "collector.stderr"
        with self.collector_log.open("wb") as err:
            self.collector = subprocess.Popen(
                niced([*console_script("backhaul-collector", "collector.cli"), "serve",
                       "--config", str(config)], self.args.receiver_nice),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        wait_for_ssh_banner(port, self.collector, "backhaul-collector")

    def harness_source(self) -> str:
        return (f'\n[[sources]]\nname = "pg"\nengine = "postgresql"\nhost = "{HOST}"\n'
                f"port = {self.server.port}\nuser = \"{self.server.superuser}\"\n"
                f'password_file = "{self.password_file}"\ndatabases = ["{DATABASE}"]\n'
                "globals = false\n")

    def start_sshd(self) -> None:
        (self.tmp / "sshd").mkdir()
        self.sshd = Sshd(self.tmp / "sshd", self.harness.ssh_keygen,
                         self.agent_key.with_suffix(".pub"), self.args.receiver_nice)
        self.sshd.start()
        self.remote = self.tmp / "remote"
        self.remote.mkdir()

    def ssh_command(self) -> list[str]:
        assert self.sshd is not None
        import getpass

        return ["ssh", "-F", "/dev/null", "-i", str(self.agent_key), "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o",
                f"UserKnownHostsFile={self.sshd.known_hosts}", "-o",
                "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", "-p",
                str(self.sshd.port), f"{getpass.getuser()}@{HOST}"]

    def warm_up(self) -> None:
        log("warm-up dump (untimed) to measure the archive size")
        done = subprocess.run(["bash", "-o", "pipefail", "-c",
                               f"{self.dump_command()} | wc -c"], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"warm-up dump failed: {done.stderr.strip()}")
        self.dataset["dump_bytes"] = int(done.stdout.strip())
        log(f"custom-format dump is {self.dataset['dump_bytes'] / 1e9:.3f} GB")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.server.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_around(self) -> dict[str, float]:
        """CPU seconds so far: the server's reaped backends (the dump's session ends with
        the method), the collector, and what sshd's reaped children used."""
        postmaster = self.postmaster_pid()
        return {"db": proc_cpu(postmaster)[1] if postmaster else 0.0,
                "collector": proc_cpu(self.collector.pid)[0] if self.collector else 0.0,
                "sshd": proc_cpu(self.sshd.pid)[1] if self.sshd else 0.0}

    def run_method(self, method: str, round_no: int) -> dict[str, Any]:
        out = (self.tmp / f"{method}{round_no}.out").open("wb")
        err_path = self.tmp / f"{method}{round_no}.err"
        err = err_path.open("wb")
        if method == "A":
            assert self.collector is not None
            reset_peak_rss(self.collector.pid)
            cmd = agent_backup(self.agent_config, DATABASE)
        elif method == "B":
            remote = shlex.quote(f"cat > {shlex.quote(str(self.remote / 'db.pgdump.zst'))}")
            cmd = ["bash", "-e", "-o", "pipefail", "-c",
                   f"{self.dump_command()} | zstd -q -3 -c | "
                   f"{shlex.join(self.ssh_command())} {remote}"]
        else:
            cmd = ["bash", "-e", "-o", "pipefail", "-c", f"{self.dump_command()} > /dev/null"]
        before = self.cpu_around()
        with out, err:
            timed = spawn_and_time(cmd, env=None, stdout=out, stderr=err, sample_children=True)
        if timed.returncode != 0:
            raise BenchError(f"method {method} failed: {err_path.read_text()[-2000:]}")
        if method == "B" and self.sshd is not None:
            wait_no_children(self.sshd.pid)
        after = self.cpu_around()
        receiver = {"A": "collector", "B": "sshd"}.get(method)
        run: dict[str, Any] = {"method": method, "round": round_no,
                               "seconds": round(timed.seconds, 3),
                               "cpu_local_s": round(timed.cpu_s, 2),
                               "cpu_db_s": round(after["db"] - before["db"], 2)}
        if receiver is not None:
            run["cpu_receiver_s"] = round(after[receiver] - before[receiver], 2)
        if method == "A":
            assert self.collector is not None
            (stored,) = (self.store / AGENT_NAME / DATABASE).glob("*.pgdump.zst")
            manifest = json.loads(Path(f"{stored}.manifest.json").read_text())
            if manifest.get("verified") is not True:
                raise BenchError("the collector did not verify the backup")
            run.update(compressed_bytes=stored.stat().st_size,
                       agent_hwm_mib=mib(timed.hwm_kib),
                       agent_ru_maxrss_mib=mib(timed.ru_maxrss_kib),
                       pg_dump_hwm_mib=mib(timed.child_hwm_kib.get("pg_dump")),
                       collector_hwm_mib=mib(read_status_kib(self.collector.pid, "VmHWM")))
            for path in (self.store / AGENT_NAME / DATABASE).iterdir():
                path.unlink()
        elif method == "B":
            target = self.remote / "db.pgdump.zst"
            run["compressed_bytes"] = target.stat().st_size
            target.unlink()
        return run

    def run(self) -> dict[str, Any]:
        missing = [t for t in ("zstd", "ssh", "ssh-keygen", "bash") if not shutil.which(t)]
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)}")
        compile_sources()
        self.start_postgres()
        self.start_collector()
        self.start_sshd()
        self.warm_up()
        import os

        load_before = os.getloadavg()
        for round_no in range(1, self.args.repeat + 1):
            for method in balanced_order(list(METHODS), round_no):
                log(f"round {round_no}/{self.args.repeat}: {method} {METHODS[method]}")
                run = self.run_method(method, round_no)
                log(f"  {run['seconds']:.2f} s" + (
                    f", agent VmHWM {run['agent_hwm_mib']:.1f} MiB" if method == "A" else ""))
                self.runs.append(run)
        result = self.result(load_before)
        if self.args.profile:
            assert self.collector is not None
            result["profile"] = profile_backup(
                "postgres", self.collector.pid, agent_backup(self.agent_config, DATABASE),
                self.tmp)
        return result

    def result(self, load_before: tuple[float, float, float]) -> dict[str, Any]:
        med = {m: median([r["seconds"] for r in self.runs if r["method"] == m])
               for m in METHODS}
        cpu = {m: {k: median([r[k] for r in self.runs if r["method"] == m and k in r])
                   for k in ("cpu_local_s", "cpu_receiver_s", "cpu_db_s")} for m in METHODS}
        sizes = {m: median([r["compressed_bytes"] for r in self.runs
                            if r["method"] == m and "compressed_bytes" in r]) for m in "AB"}
        peak = max(r["agent_hwm_mib"] for r in self.runs if r["method"] == "A")
        ratio = (med["A"] or 0) / (med["B"] or 1)
        return {
            "benchmark": "postgres",
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "args": {"size_gb": self.args.size_gb, "repeat": self.args.repeat,
                     "receiver_nice": self.args.receiver_nice},
            "machine": {**machine_info(load_before, {
                "pg_dump": tool_version(["pg_dump", "--version"]),
                "zstd": tool_version(["zstd", "--version"])}), "source": source_revision()},
            "dataset": self.dataset,
            "median_s": med,
            "median_cpu_s": cpu,
            "compressed_bytes": sizes,
            "ratios": {"backhaul_over_pipe": ratio,
                       "backhaul_over_floor": (med["A"] or 0) / (med["D"] or 1)},
            "targets": [
                {"name": "Backhaul/pipe ratio", "value": ratio, "limit": "<= 1.0",
                 "pass": ratio <= TARGET_PIPE_RATIO},
                {"name": "agent peak RSS (MiB)", "value": peak, "limit": "< 80",
                 "pass": peak < TARGET_AGENT_RSS_MIB},
            ],
            "runs": self.runs,
        }

    def close(self) -> None:
        stop_process(self.collector)
        if self.sshd is not None:
            self.sshd.stop()
        if self.server is not None:
            self.server.close()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, run one more backup under py-spy")
    parser.add_argument("--receiver-nice", type=int, default=0, metavar="N",
                        help="run the receiving side (collector; sshd) at niceness N, so it "
                             "stands for another machine (as core_path.py)")
    args = parser.parse_args(argv)
    bench = Bench(args)
    try:
        result = bench.run()
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        bench.close()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (OUT_DIR / f"postgres-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"\nPostgreSQL, {result['dataset']['dump_bytes'] / 1e9:.2f} GB dump, "
          f"{args.repeat} round(s); medians:")
    for method, label in METHODS.items():
        size = result["compressed_bytes"].get(method)
        cpu = result["median_cpu_s"][method]
        print(f"  {method} {label:55} {result['median_s'][method]:7.2f} s"
              + (f"  {size / 1e6:8.1f} MB" if size else " " * 13)
              + "   CPU s: " + ", ".join(f"{part} {cpu[key]:.2f}" for part, key in (
                  ("local", "cpu_local_s"), ("receiver", "cpu_receiver_s"),
                  ("db", "cpu_db_s")) if cpu[key] is not None))
    for target in result["targets"]:
        print(f"  {target['name']}: {target['value']:.3f} ({target['limit']}) "
              f"{'PASS' if target['pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
