"""A collector without off-site targets never loads the S3 client (about 10 MiB of RSS)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, types
import collector.cli
from collector.offsite import commands
config = types.SimpleNamespace(offsite=())
commands.check_locks(config)
assert commands.check_targets(config) == []
assert commands.prune_targets(config, dry_run=False)
print(sorted(m for m in sys.modules if m.split(".")[0] in {"boto3", "botocore"}))
"""


def test_start_check_and_prune_without_targets_do_not_import_boto3() -> None:
    """In a fresh interpreter: the modules `serve`, `check-config` and `prune` load."""
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
