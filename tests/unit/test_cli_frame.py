"""The frame around a command: expected failures become one line and an exit status."""

from __future__ import annotations

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
