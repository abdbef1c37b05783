"""Freed buffers are reused, not returned to the kernel and faulted in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import resource, sys
from common.memory import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def burst():
    # What a backup does per MiB: several packet-sized buffers alive, then all freed.
    buffers = [bytearray(256 << 10) for _ in range(8)]
    del buffers
for _ in range(3):
    burst()
before = faults()
for _ in range(50):
    burst()
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_buffers_freed_together_are_reused_without_page_faults() -> None:
    pages = 50 * 8 * (256 << 10) // 4096
    assert page_faults("off") > pages // 2, "glibc's defaults give the heap back each time"
    assert page_faults("on") < pages // 50
