"""Collector commands other than serve start without the server's HTTP stack: every
`list`, `verify`, `prune` or `offsite sync` run would otherwise load aiohttp and the
server's modules for nothing (about a tenth of a second and 10 MiB here)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import collector.cli
print(sorted(m for m in sys.modules
             if m.split(".")[0] == "aiohttp" or m.startswith("collector.serve")))
"""


def test_the_collector_cli_loads_neither_aiohttp_nor_the_server_until_serve_runs() -> None:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
