"""`check-config --as-user USER`: the same check, run again as the service's user.

A configuration that root can read may still be unreadable to the unprivileged user the
systemd unit runs as (a key left 0600 root, a folder without group access). Run as that
user, the check meets exactly the service's permissions. Needs root.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

from common.errors import ConfigError


def check_as_user(user: str, module: str, config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> check-config --config <config>`` as ``user``.

    Raises:
        ConfigError: not root, no such user, or the user cannot run this Python.
    """
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--as-user {user!r}: no such user") from None
    if os.geteuid() != 0:
        raise ConfigError("--as-user needs root (it runs the check as that user)")
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    try:
        return subprocess.run(
            [sys.executable, "-m", module, "check-config", "--config", str(config.absolute())],
            user=account.pw_uid, group=account.pw_gid, extra_groups=groups,
            cwd="/", env={"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"},
            capture_output=True, text=True, check=False,
        )
    except OSError as exc:
        raise ConfigError(
            f"--as-user {user!r}: cannot run {sys.executable} as that user: {exc.strerror}"
        ) from None
