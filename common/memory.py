"""Keep freed heap memory for reuse instead of handing it back to the kernel at once.

A backup moves every byte through short-lived buffers of 256 KiB to 1 MiB (SSH packets,
frames, compressed pieces). glibc's default trim threshold adapts to twice the largest
freed block, so the top of the heap was given back (``brk``) and taken again, with a
page fault and a zero-filled page for every 4 KiB, over and over (py-spy showed ``brk``
under the SSH send path). On the 1 GB backup of ``bench/core_path.py`` the agent's main
thread used 1.5 CPU-s, 0.9 with the thresholds fixed as below (its CPU time read from
/proc). Fixed thresholds keep up to ``TRIM_THRESHOLD`` of free heap for the next
buffers; peak memory stays what the buffers need (agent peak RSS 60 MiB either way).

Only glibc has these knobs; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 * 1024 * 1024
MMAP_THRESHOLD = 16 * 1024 * 1024  # blocks below this come from the reusable heap


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; True if they were set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
    if not done:
        log.debug("malloc thresholds not set (not glibc?)")
    return done
