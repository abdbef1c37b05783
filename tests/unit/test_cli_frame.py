"""The frame around a command: expected failures become one line and an exit status."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.cli import run_command
from common.errors import ConfigError, ExitCode, IntegrityError


def fail(exc: BaseException) -> int:
    raise exc


def test_a_configuration_mistake_is_one_line_and_the_config_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = run_command("prog", lambda: fail(ConfigError("no [agent] table")),
                         on_interrupt=lambda: 99)
    assert status == ExitCode.CONFIG
    assert capsys.readouterr().err == "prog: configuration error: no [agent] table\n"


def test_other_errors_exit_with_their_own_code_and_control_characters_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = run_command("prog", lambda: fail(IntegrityError("bad\x1b[31m name")),
                         on_interrupt=lambda: 99)
    assert status == IntegrityError("x").exit_code != ExitCode.OK
    err = capsys.readouterr().err
    assert err.startswith("prog: bad") and "\x1b" not in err and err.count("\n") == 1


def test_ctrl_c_is_the_callers_decision_and_success_passes_through() -> None:
    assert run_command("prog", lambda: fail(KeyboardInterrupt()), on_interrupt=lambda: 7) == 7
    assert run_command("prog", lambda: 0, on_interrupt=lambda: 7) == 0


def test_a_bug_is_not_swallowed() -> None:
    with pytest.raises(ZeroDivisionError):
        run_command("prog", lambda: 1 // 0, on_interrupt=lambda: 7)


ROOT = Path(__file__).resolve().parents[2]
# The console scripts pip installs, as pyproject.toml declares them: command -> "module:function".
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "scripts"
]
# At exit, after the command: are the objects frozen, and did the usual shutdown run?
WATCH_EXIT = """
import atexit, gc, sys
left_open = open(sys.argv[1] + ".log", "w")  # buffered, never flushed nor closed here:
left_open.write("last line\\n")  # only the interpreter's teardown writes it out
atexit.register(lambda: print("frozen" if gc.get_freeze_count() else "not frozen"))
sys.stdout.write("unflushed ")
sys.argv[1:] = ["--help"]
from {module} import {function} as entry_point
entry_point()
"""


def test_every_program_has_its_console_script() -> None:
    """Each program's command is installed, whatever else the table declares."""
    assert {"agent.cli", "collector.cli", "certs.cli"} <= {
        target.partition(":")[0] for target in SCRIPTS.values()
    }


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_a_console_script_ends_without_the_last_collections_but_with_a_normal_shutdown(
    command: str, tmp_path: Path,
) -> None:
    """Run as pip's wrapper runs it: import the declared entry point and call it."""
    module, _, function = SCRIPTS[command].partition(":")
    done = subprocess.run(
        [sys.executable, "-c", WATCH_EXIT.format(module=module, function=function),
         str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"unflushed usage: {command} ")
    assert done.stdout.rstrip().endswith("frozen") and "not frozen" not in done.stdout
    assert (tmp_path / "x.log").read_text() == "last line\n"


def test_a_script_exits_with_the_status_of_its_main() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from common.cli import run_script; run_script(lambda: 3)"],
        cwd=ROOT, timeout=60, check=False,
    )
    assert done.returncode == 3
