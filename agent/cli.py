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
from pathlib import Path

from agent.client import CollectorClient
from agent.config import AgentConfig, load_agent_config
from agent.runner import BackupResult, BackupRunner, run_exit_code
from common.errors import BackhaulError, ConfigError, ExitCode
from common.logsetup import escape_control, setup_logging

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
    check = sub.add_parser("check-config", help="validate agent.toml and exit")
    check.add_argument("--config", type=Path, required=True)
    return parser


def _err(message: str) -> None:
    print(f"{PROG}: {escape_control(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_agent_config(args.config)
        if args.command == "check-config":
            print(f"{args.config}: OK ({len(config.sources)} source(s))")
            return ExitCode.OK
        setup_logging(PROG, config.log_dir, use_syslog=config.syslog,
                      stderr_level=logging.INFO if args.verbose else None)
        return asyncio.run(_backup(config, args.source, args.database))
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return ExitCode.CONFIG
    except BackhaulError as exc:
        _err(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted; nothing partial is kept on the collector")
        return ExitCode.FAILED


async def _backup(config: AgentConfig, source: str | None, database: str | None) -> int:
    if source is not None and config.source(source) is None:
        raise ConfigError(f"no source named {source!r} in {config.source_file}")
    if database is not None and source is None and len(config.sources) > 1:
        raise ConfigError("--database needs --source when several sources are configured")
    try:
        async with CollectorClient(config) as client:
            results = await BackupRunner(config, client).run(source, database)
    except BackhaulError as exc:
        log.error("backup run failed: %s", exc)
        raise
    _print(results)
    return run_exit_code(results)


def _print(results: list[BackupResult]) -> None:
    for result in results:
        print(result.line(), file=sys.stdout if result.ok else sys.stderr)
    failed = sum(not r.ok for r in results)
    summary = f"{len(results) - failed} stored, {failed} failed"
    print(summary, file=sys.stdout if not failed else sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
