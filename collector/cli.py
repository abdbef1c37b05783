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
from collections.abc import Sequence
from pathlib import Path

from collector.config import CollectorConfig, load_collector_config
from collector.outcomes import FanOut
from collector.server import CollectorServer, make_context
from common.errors import BackhaulError, ConfigError, ExitCode
from common.logsetup import escape_control, setup_logging

PROG = "backhaul-collector"
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the SSH server that receives backups")
    serve.add_argument("--config", type=Path, required=True, help="path to collector.toml")
    serve.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    check = sub.add_parser("check-config", help="validate collector.toml and exit")
    check.add_argument("--config", type=Path, required=True)
    return parser


def _err(message: str) -> None:
    print(f"{PROG}: {escape_control(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_collector_config(args.config)
        if args.command == "check-config":
            print(f"{args.config}: OK ({len(config.agents)} agent(s))")
            return ExitCode.OK
        setup_logging(PROG, config.log.dir, use_syslog=config.log.syslog,
                      level=getattr(logging, config.log.level.upper()),
                      stderr_level=logging.INFO if args.verbose else logging.ERROR)
        return asyncio.run(serve(config))
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return ExitCode.CONFIG
    except BackhaulError as exc:
        _err(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK


async def serve(config: CollectorConfig, ready: asyncio.Future[int] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully.

    ``ready``, when given, receives the bound port once the server listens.
    """
    from collector.wiring import build_sinks

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


if __name__ == "__main__":
    sys.exit(main())
