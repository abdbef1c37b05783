"""The frame around every Backhaul command's work: an expected failure ends as one clear
line on stderr and the exit status its error carries, never as a traceback.

Configuration mistakes say so ("configuration error: ...") and exit with
:attr:`ExitCode.CONFIG`; any other :class:`BackhaulError` exits with its own code. What
Ctrl-C means differs per command, so the caller says what to do then.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import NoReturn

from common.errors import BackhaulError, ConfigError, ExitCode
from common.text import escape_control


def print_error(prog: str, message: str) -> None:
    """``prog: message`` on stderr, control characters escaped (names come from input)."""
    print(f"{prog}: {escape_control(message, backslash=False)}", file=sys.stderr)


def run_script(main: Callable[[], int]) -> NoReturn:
    """Run a console script's ``main`` and exit with its status, without the garbage
    collector's last passes.

    At exit CPython runs full collections over every object its imports made: about
    50 ms of CPU after every command once asyncssh and cryptography are loaded, a
    one-shot backup's last wait. The process is ending and its memory goes with it, so
    those objects are frozen (:func:`gc.freeze`), however ``main`` ends, and the passes
    skip them; everything else still runs as usual (atexit handlers,
    ``logging.shutdown``, flushing the standard streams).
    """
    try:
        status = main()
    finally:
        gc.freeze()
    sys.exit(status)


def run_command(prog: str, work: Callable[[], int], *,
                on_interrupt: Callable[[], int]) -> int:
    """Run ``work`` and turn its expected failures into an exit status."""
    try:
        return work()
    except ConfigError as exc:
        print_error(prog, f"configuration error: {exc}")
        return ExitCode.CONFIG
    except BackhaulError as exc:
        print_error(prog, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return on_interrupt()
