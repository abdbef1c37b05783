"""`backhaul-collector`: the command line of the backup-host side.

A user mistake (bad configuration, busy port) is one line on stderr and a non-zero
exit; never a traceback. Exit codes are those of common.errors.ExitCode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from collector.config import CollectorConfig, load_collector_config
from collector.enrol import enrol_agent, parse_databases
from collector.offsite import commands as offsite_commands
from collector.store import files as storage
from collector.store import inventory, listing, prune, verify_status
from common.as_user import check_as_user
from common.cli import run_command, run_script
from common.errors import ConfigError, ExitCode
from common.logsetup import SafeFormatter, setup_logging
from common.memory import keep_freed_memory
from common.text import human_bytes

PROG = "backhaul-collector"
DEFAULT_CONFIG = Path("/etc/backhaul/collector.toml")
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the SSH server that receives backups")
    serve.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    serve.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    check = sub.add_parser("check-config", help="validate collector.toml and exit")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--as-user", metavar="USER",
                       help="check again as this user (the service's, backhaul), so files "
                            "it cannot read are found now; needs root")
    enrol = sub.add_parser("enrol-agent", help="accept an agent's public key (then reload "
                                               "the running collector)")
    enrol.add_argument("name", help="the agent's name, as in its agent.toml")
    enrol.add_argument("public_key", type=Path, help="the agent's public key file")
    enrol.add_argument("--databases", metavar="A,B",
                       help="accept only these databases (default: every one it sends)")
    enrol.add_argument("--replace", action="store_true",
                       help="replace the key and databases of an agent enrolled before")
    enrol.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"path to collector.toml (default {DEFAULT_CONFIG})")
    pruning = sub.add_parser("prune", help="delete old backups as [retention] says")
    pruning.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    pruning.add_argument("--dry-run", action="store_true", help="print the plan, delete nothing")
    pruning.add_argument("--agent", help="only this agent")
    pruning.add_argument("--database", help="only this database")
    pruning.add_argument("--show-kept", action="store_true", help="list kept backups and why")
    pruning.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    pruning.set_defaults(operation=_prune)
    lister = sub.add_parser("list", help="print the stored backups")
    lister.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    lister.add_argument("--agent", help="only this agent")
    lister.add_argument("--database", help="only this database")
    lister.set_defaults(operation=_list)
    verifying = sub.add_parser("verify", help="re-hash stored backups against their manifests")
    verifying.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    scope = verifying.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all", action="store_true", help="every backup in the store")
    scope.add_argument("--agent", help="only this agent")
    verifying.add_argument("--database", help="only this database (with --agent)")
    verifying.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    verifying.set_defaults(operation=_verify)
    offsite_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, lambda: _command(args), on_interrupt=lambda: ExitCode.OK)


def _command(args: argparse.Namespace) -> int:
    if args.command == "enrol-agent":
        return _enrol(args)
    config = load_collector_config(args.config)
    if args.command == "check-config":
        return _check_config(config, args.as_user)
    operation: Operation | None = getattr(args, "operation", None)
    if operation is not None:
        return operation(config, args)
    setup_logging(PROG, config.log.dir, use_syslog=config.log.syslog,
                  level=getattr(logging, config.log.level.upper()),
                  stderr_level=logging.INFO if args.verbose else logging.ERROR)
    keep_freed_memory()
    return asyncio.run(serve(config))


def _enrol(args: argparse.Namespace) -> int:
    databases = parse_databases(args.databases)
    dropin = enrol_agent(args.config, args.name, args.public_key, databases,
                         replace=args.replace)
    accepts = ", ".join(databases) if databases is not None else "every database"
    print(f"enrolled agent {args.name} ({accepts}) in {dropin}")
    print("a running collector accepts it after: systemctl reload backhaul-collector")
    return ExitCode.OK


def _check_config(config: CollectorConfig, as_user: str | None) -> int:
    if as_user is not None:
        checked = check_as_user(as_user, "collector.cli", config.source)
        if checked.returncode != 0:
            print(checked.stderr, end="", file=sys.stderr)
            raise ConfigError(f"{config.source} does not check out as user {as_user!r}")
    for line in offsite_commands.check_targets(config):
        print(line)
    print(f"{config.source}: OK ({len(config.agents)} agent(s))"
          + (f", also as user {as_user}" if as_user else ""))
    return ExitCode.OK


async def serve(config: CollectorConfig, ready: asyncio.Future[int] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    ``ready``, when given, receives the bound port once the server listens.
    """
    # Imported here, not at the top: the server, its metrics and their HTTP stack take
    # about a tenth of a second to load, which every other command would pay for nothing.
    from collector.report.outcomes import FanOut
    from collector.report.sinks import build_sinks
    from collector.serve.reload import reload_agents
    from collector.serve.server import CollectorServer, make_context

    # Refuses a locked target on a bucket without Object Lock before serving anything.
    await asyncio.to_thread(offsite_commands.check_locks, config)
    sinks, closers = await build_sinks(config)
    ctx = make_context(config, FanOut(*sinks))
    ctx.store.ensure_root()
    swept = await asyncio.to_thread(ctx.store.sweep)
    if swept:
        log.warning("removed %d leftover file(s) of interrupted backups", swept)
    server = CollectorServer(config, ctx)
    await server.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Not possible outside the main thread (tests run the server in-process).
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload_agents, server, sinks)
    if ready is not None:
        ready.set_result(server.port)
    try:
        await stop.wait()
        log.info("shutting down: no new connections, draining running backups")
        await server.stop()
    finally:
        for close in closers:
            await close()
    log.info("stopped")
    return ExitCode.OK


Operation = Callable[[CollectorConfig, argparse.Namespace], int]


def _console_logging(verbose: bool) -> None:
    """Warnings (everything with -v) on stderr only, for commands that change nothing."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(PROG, "%(program)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.addHandler(handler)


def _file_logging(config: CollectorConfig, stderr_level: int | None) -> None:
    setup_logging(PROG, config.log.dir, use_syslog=config.log.syslog,
                  level=getattr(logging, config.log.level.upper()), stderr_level=stderr_level)


def _known_agent(config: CollectorConfig, agent: str | None) -> None:
    if agent is None:
        return
    storage.check_agent_name(agent)
    if config.agent(agent) is None and not (config.storage.root / agent).is_dir():
        raise ConfigError(f"--agent {agent!r} is neither in {config.source} nor in the store")


def _prune(config: CollectorConfig, args: argparse.Namespace) -> int:
    if args.dry_run:
        _console_logging(args.verbose)
        run = prune.plan_store(config, args.agent, args.database)
    else:
        _file_logging(config, logging.INFO if args.verbose else logging.WARNING)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        run = prune.prune_store(config, args.agent, args.database, stop.is_set)
    actions = prune.actions_table(run, args.dry_run, args.show_kept)
    if actions is not None:
        print(actions, end="\n\n")
    print(prune.summary_table(run, args.dry_run))
    if not offsite_commands.prune_targets(config, args.dry_run) and not run.stopped:
        return ExitCode.STORAGE
    if run.stopped:
        return ExitCode.FAILED
    return ExitCode.STORAGE if run.failed else ExitCode.OK


def _list(config: CollectorConfig, args: argparse.Namespace) -> int:
    _console_logging(False)
    _known_agent(config, args.agent)
    root = config.storage.root
    entries = inventory.scan(root, args.agent, args.database)
    if not entries:
        print("no backups found")
        return ExitCode.OK
    rows = listing.listing_rows(entries, verify_status.load_status_or_warn(root),
                                config.storage.timezone)
    print(listing.render_table(listing.LIST_HEADERS, rows, right=[3]))
    total = human_bytes(listing.total_size(entries))
    print(f"{len(entries)} backup(s), {total}")
    return ExitCode.OK


def _verify(config: CollectorConfig, args: argparse.Namespace) -> int:
    if args.database is not None and args.agent is None:
        raise ConfigError("--database needs --agent")
    _known_agent(config, args.agent)
    _file_logging(config, logging.INFO if args.verbose else None)
    scope = verify_status.Scope(args.agent, args.database)
    run = inventory.verify_store(config.storage.root, scope, config.storage.max_expansion,
                                 progress=lambda check: print(listing.format_check(check)))
    print(f"{len(run.checks)} backup(s) checked, {len(run.mismatches)} mismatch(es)")
    return ExitCode.INTEGRITY if run.mismatches else ExitCode.OK


def script() -> NoReturn:
    """The ``backhaul-collector`` console script."""
    run_script(main)


if __name__ == "__main__":
    script()
