"""Progress: the terminal bar, the log lines, and the pipeline updating a meter."""

from __future__ import annotations

import io
import logging

import pytest

from agent.progress import ProgressDisplay, human_duration
from agent.stream.stages import run_pipeline
from common.compression import make_compressor
from common.text import human_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bar_display(clock: Clock, columns: int = 100) -> tuple[ProgressDisplay, io.StringIO]:
    stream = io.StringIO()
    return ProgressDisplay(stream, interactive=True, clock=clock, columns=lambda: columns), stream


def test_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_duration(83) == "1:23"
    assert human_duration(3725) == "1:02:05"


def test_bar_shows_bytes_rate_percent_and_eta() -> None:
    clock = Clock()
    display, stream = bar_display(clock)
    meter = display.meter("hospital", 4000)
    clock.now = 2.0
    meter.raw_bytes += 1000
    line = stream.getvalue().rsplit("\r", 1)[-1]
    assert line.startswith("hospital [######")
    assert " 25%" in line and "1000 B" in line and "500 B/s" in line and "ETA 0:06" in line


def test_bar_redraws_at_most_a_few_times_a_second() -> None:
    clock = Clock()
    display, stream = bar_display(clock)
    meter = display.meter("db", 10_000)
    clock.now = 1.0
    for _ in range(100):
        meter.raw_bytes += 10
    assert stream.getvalue().count("\r") == 1


def test_finish_ends_the_line_once_and_a_new_meter_ends_the_previous() -> None:
    clock = Clock()
    display, stream = bar_display(clock)
    first = display.meter("one", None)
    clock.now = 1.0
    first.raw_bytes += 10
    display.meter("two", None)
    assert stream.getvalue().count("\n") == 1
    display.finish()
    display.finish()
    assert stream.getvalue().count("\n") == 1  # "two" never drew, so no empty line


def test_bar_fits_the_terminal_and_escapes_the_label() -> None:
    clock = Clock()
    display, stream = bar_display(clock, columns=50)
    meter = display.meter("a\x1b[31mvery long database name " * 3, 100)
    clock.now = 1.0
    meter.raw_bytes += 50
    line = stream.getvalue().rsplit("\r", 1)[-1].removesuffix("\x1b[K")
    assert len(line) <= 49
    assert "\x1b[31m" not in line


def test_past_the_estimate_the_percent_stays_below_100() -> None:
    clock = Clock()
    display, stream = bar_display(clock)
    meter = display.meter("db", 100)
    clock.now = 1.0
    meter.raw_bytes += 500
    line = stream.getvalue().rsplit("\r", 1)[-1]
    assert " 99%" in line and "ETA --:--" in line


def test_without_a_terminal_progress_goes_to_the_log_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=False, clock=clock, log_interval=30)
    meter = display.meter("hospital", 2048)
    with caplog.at_level(logging.INFO, logger="agent.progress"):
        clock.now = 10
        meter.advance(512)
        clock.now = 31
        meter.advance(512)
        clock.now = 40
        meter.advance(512)
    display.finish()
    assert stream.getvalue() == ""
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["hospital: 1.0 KiB of about 2.0 KiB (50%), 33 B/s, ETA 0:31"]


def test_for_stream_is_a_bar_only_on_a_terminal() -> None:
    assert not ProgressDisplay.for_stream(io.StringIO()).interactive


async def test_the_backup_pipeline_drives_a_meter() -> None:
    clock = Clock()
    display, stream = bar_display(clock)
    meter = display.meter("db", 3 * 65536)

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(3):
            clock.now += 1
            yield b"x" * 65536

    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    result = await run_pipeline(chunks(), make_compressor("zstd"), send, progress=meter)
    assert result.raw_bytes == meter.done == 3 * 65536
    assert result.byte_count == sum(map(len, sent))
    assert "%" in stream.getvalue()
