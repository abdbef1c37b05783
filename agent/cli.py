"""`backhaul-agent`: the command line of the database-host side.

A user mistake (bad configuration, unknown source) is one line on stderr and exit 2;
never a traceback. Exit codes are those of common.errors.ExitCode.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from agent.config import DEFAULT_STOP_TIMEOUT, AgentConfig, load_agent_config
from agent.db_lock import hold_database
from agent.first_contact import check_agent_files
from agent.guard import database_guard
from agent.link.pending import PendingClient
from agent.progress import ProgressDisplay
from agent.runner import BackupResult, BackupRunner, run_exit_code
from agent.schedule import parse_schedule

if TYPE_CHECKING:
    from agent.restore.restore import RestoreRequest
# The SSH stack (agent.link.connection, agent.link.requests, agent.service) is imported where it is
# used: a one-shot backup loads it in the background while its first dump starts.
from common.as_user import check_as_user
from common.cli import print_error, run_command, run_script
from common.errors import BackhaulError, ConfigError, ExitCode
from common.logsetup import setup_logging
from common.memory import keep_freed_memory
from common.text import escape_control

PROG = "backhaul-agent"
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    backup = sub.add_parser("backup", help="back up the configured databases once, now")
    backup.add_argument("--config", type=Path, required=True, help="path to agent.toml")
    backup.add_argument("--source", help="only this [[sources]] name")
    backup.add_argument("--database", help="only this database (with --source if several)")
    backup.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    _wait_argument(backup)
    check = sub.add_parser("check-config", help="validate agent.toml, show each source's "
                                                "next run, and exit")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--as-user", metavar="USER",
                       help="check again as this user (the service's, backhaul-agent), "
                            "so files it cannot read are found now; needs root")
    run = sub.add_parser("run", help="run as a service: back up each source on its schedule")
    run.add_argument("--config", type=Path, required=True, help="path to agent.toml")
    run.add_argument("--grace", type=_seconds, default=0.0, metavar="SECONDS",
                     help="on SIGTERM, let running backups finish this long before "
                          "aborting them (default 0)")
    run.add_argument("--stop-timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                     metavar="SECONDS", help="then wait this long for them to stop "
                                             f"(default {DEFAULT_STOP_TIMEOUT:.0f})")
    run.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    restore = sub.add_parser("restore", help="restore a backup from the collector")
    _restore_arguments(restore)
    restore.add_argument("--date", type=_day, metavar="YYYYMMDD",
                         help="the newest backup of this day (default: the newest)")
    restore.add_argument("--into", metavar="NAME", help="restore into this database instead")
    restore.add_argument("--force", action="store_true",
                         help="replace the target database if it already holds anything")
    drill = sub.add_parser("drill", help="restore the latest backup into a scratch database, "
                                         "compare, drop it and report to the collector")
    _restore_arguments(drill)
    return parser


def _restore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="path to agent.toml")
    parser.add_argument("--database", required=True, help="the database whose backup to use")
    parser.add_argument("--source", help="the [[sources]] server to restore to "
                                         "(needed when several are configured)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    _wait_argument(parser)


def _wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="if another backup, restore or drill of the database runs on "
                             "this host, wait for it instead of failing at once")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError("give 0 to 86400 seconds")
    return value


def _day(text: str) -> date:
    try:
        if len(text) != 8 or not text.isdecimal():
            raise ValueError
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date as yyyymmdd") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, lambda: _command(args), on_interrupt=_interrupted)


def _interrupted() -> int:
    print_error(PROG, "interrupted; nothing partial is kept on the collector")
    return ExitCode.FAILED


def _command(args: argparse.Namespace) -> int:
    config = load_agent_config(args.config)
    check_agent_files(config)
    if args.command == "check-config":
        return _check_config(config, args.as_user)
    stderr_level = logging.INFO if args.verbose else None
    setup_logging(PROG, config.log_dir, use_syslog=config.syslog, stderr_level=stderr_level)
    keep_freed_memory()
    if args.command == "run":
        return asyncio.run(_run(config, args.grace, args.stop_timeout, stderr_level))
    if args.command == "restore":
        from agent.restore.restore import RestoreRequest

        request = RestoreRequest(args.database, args.source, args.date, args.into, args.force)
        return asyncio.run(_restore(config, request, args.wait))
    if args.command == "drill":
        return asyncio.run(_drill(config, args.database, args.source, args.wait))
    return asyncio.run(_backup(config, args.source, args.database, args.wait))


def _check_config(config: AgentConfig, as_user: str | None) -> int:
    if as_user is not None:
        checked = check_as_user(as_user, "agent.cli", config.source_file)
        if checked.returncode != 0:
            print(checked.stderr, end="", file=sys.stderr)
            raise ConfigError(f"{config.source_file} does not check out as user {as_user!r}")
    print(f"{config.source_file}: OK ({len(config.sources)} source(s))"
          + (f", also as user {as_user}" if as_user else ""))
    for line in schedule_lines(config, datetime.now().astimezone()):
        print(f"  {line}")
    return ExitCode.OK


def schedule_lines(config: AgentConfig, now: datetime) -> list[str]:
    """One line per source: its schedule, whether it is the default, and its next run."""
    lines = []
    for source in config.sources:
        if source.schedule is None:
            lines.append(f"source {source.name}: no schedule; only `{PROG} backup` runs it")
            continue
        following = parse_schedule(source.schedule).next_after(now)
        default = " (the default)" if source.default_schedule else ""
        delay = f" + up to {source.random_delay:.0f} s" if source.random_delay else ""
        lines.append(f"source {source.name}: schedule {source.schedule!r}{default}, "
                     f"next run {following:%Y-%m-%d %H:%M %Z}{delay}")
    return lines


async def _backup(config: AgentConfig, source: str | None, database: str | None,
                  wait: bool) -> int:
    if source is not None and config.source(source) is None:
        raise ConfigError(f"no source named {source!r} in {config.source_file}")
    if database is not None and source is None and len(config.sources) > 1:
        raise ConfigError("--database needs --source when several sources are configured")
    display = ProgressDisplay.for_stream()
    link = PendingClient(config)
    try:
        guard = database_guard(config, f"{PROG} backup", wait=wait)
        runner = BackupRunner(config, link, progress_factory=display.meter, guard=guard)
        results = await runner.run(source, database)
    except BackhaulError as exc:
        log.error("backup run failed: %s", exc)
        raise
    finally:
        await link.close()
        display.finish()
    _print(results)
    return run_exit_code(results)


async def _run(config: AgentConfig, grace: float, stop_timeout: float,
               stderr_level: int | None) -> int:
    def relog(new: AgentConfig) -> None:
        setup_logging(PROG, new.log_dir, use_syslog=new.syslog, stderr_level=stderr_level)

    from agent.service import AgentService

    for source in config.sources:
        if source.default_schedule:
            log.info("source %s has no schedule: using the default %r with a random delay "
                     "of up to %.0f s (set schedule in %s to choose)", source.name,
                     source.schedule, source.random_delay, config.source_file)
    service = AgentService(config, grace=grace, stop_timeout=stop_timeout, on_reload=relog)
    return await service.run()


async def _restore(config: AgentConfig, request: RestoreRequest, wait: bool) -> int:
    from agent.link.connection import CollectorClient
    from agent.restore.restore import pick_source, restore

    source = pick_source(config, request.source)
    display = ProgressDisplay.for_stream()
    try:
        async with (
            hold_database(config.run_dir, source.name, request.target, f"{PROG} restore",
                          wait=wait),
            CollectorClient(config) as client,
        ):
            outcome = await restore(config, request, client, meter=display.meter)
    except BackhaulError as exc:
        log.error("restore of %s failed: %s", escape_control(request.database), exc)
        raise
    finally:
        display.finish()
    print(outcome.line())
    return ExitCode.OK


async def _drill(config: AgentConfig, database: str, source: str | None, wait: bool) -> int:
    from agent.link.connection import CollectorClient
    from agent.restore.restore import pick_source

    source_name = pick_source(config, source).name
    display = ProgressDisplay.for_stream()
    try:
        async with (
            hold_database(config.run_dir, source_name, database, f"{PROG} drill", wait=wait),
            CollectorClient(config) as client,
        ):
            from agent.restore.drill import run_drill  # pymongo and restore code: load on demand

            result = await run_drill(config, database, source, client, meter=display.meter)
    finally:
        display.finish()
    print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    return result.exit_code


def _print(results: list[BackupResult]) -> None:
    for result in results:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    failed = sum(not r.ok for r in results)
    summary = f"{len(results) - failed} stored, {failed} failed"
    print(summary, file=sys.stdout if not failed else sys.stderr)


def script() -> NoReturn:
    """The ``backhaul-agent`` console script."""
    run_script(main)


if __name__ == "__main__":
    script()
