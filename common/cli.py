"""The frame around every Backhaul command's work: an expected failure ends as one clear
line on stderr and the exit status its error carries, never as a traceback.

Configuration mistakes say so ("configuration error: ...") and exit with
:attr:`ExitCode.CONFIG`; any other :class:`BackhaulError` exits with its own code. What
Ctrl-C means differs per command, so the caller says what to do then.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import BackhaulError, ConfigError, ExitCode
from common.logsetup import escape_control


def print_error(prog: str, message: str) -> None:
    """``prog: message`` on stderr, control characters escaped (names come from input)."""
    print(f"{prog}: {escape_control(message)}", file=sys.stderr)


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
