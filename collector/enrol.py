"""`backhaul-collector enrol-agent`: admit an agent by its public key, without editing TOML.

The agent's key and a small NAME.toml go into the drop-in folder beside collector.toml
(:func:`collector.config.agents_dir`), next to any ``[[agents]]`` tables, which keep
working. Both files are written whole (temporary file, then rename), owned by root and
readable by the folder's group (the service's), like the rest of /etc/backhaul. The
configuration is then read back in full; if it no longer loads, the new files are removed
and nothing changed. A running collector accepts the agent after a reload (SIGHUP,
``systemctl reload backhaul-collector``); running uploads are not interrupted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from collector.config import agents_dir, load_collector_config
from common.errors import ConfigError
from common.identity import is_valid_agent_name


def parse_databases(text: str | None) -> tuple[str, ...] | None:
    """``--databases a,b`` as a tuple; None (every database) when not given.

    Raises:
        ConfigError: an empty list or an empty name.
    """
    if text is None:
        return None
    names = tuple(part.strip() for part in text.split(","))
    if not names or not all(names):
        raise ConfigError(f"--databases {text!r}: give names separated by commas")
    return names


def enrol_agent(config_path: Path, name: str, key_file: Path,
                databases: Sequence[str] | None, *, replace: bool = False) -> Path:
    """Write the drop-in for agent ``name`` with the key in ``key_file``; return its path.

    Raises:
        ConfigError: a bad name or key, the agent exists (and not ``replace``), or the
            configuration does not load with the new agent.
    """
    if not is_valid_agent_name(name):
        raise ConfigError(f"agent name {name!r}: use letters, digits, '-', '_' and '.', "
                          "not starting with '.' or '-'")
    try:
        key = asyncssh.read_public_key(str(key_file))
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{key_file}: not a readable SSH public key: {exc}") from None
    config = load_collector_config(config_path)
    folder = agents_dir(config_path)
    dropin, pub = folder / f"{name}.toml", folder / f"{name}.pub"
    if config.agent(name) is not None and not (replace and dropin.exists()):
        where = dropin if dropin.exists() else config_path
        hint = " (--replace to change its key or databases)" if dropin.exists() else ""
        raise ConfigError(f"agent {name!r} is already configured in {where}{hint}")
    folder.mkdir(mode=0o750, exist_ok=True)
    group = folder.stat().st_gid
    _write(pub, key.export_public_key("openssh").decode("ascii"), group)
    _write(dropin, _dropin_text(name, pub, databases), group)
    try:
        load_collector_config(config_path)
    except ConfigError:
        for path in (dropin, pub):
            path.unlink(missing_ok=True)
        raise
    return dropin


def _dropin_text(name: str, pub: Path, databases: Sequence[str] | None) -> str:
    lines = [
        "# Written by backhaul-collector enrol-agent; the keys of one [[agents]] table.",
        f"name = {_toml_string(name)}",
        f"public_key = {_toml_string(str(pub))}",
    ]
    if databases is not None:
        lines.append(f"databases = [{', '.join(_toml_string(d) for d in databases)}]")
    else:
        lines.append("# No databases list: every database of this agent is accepted.")
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string, with anything unprintable escaped."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\U{ord(c):08x}" for c in escaped) + '"'


def _write(path: Path, text: str, group: int) -> None:
    """Replace ``path`` whole with ``text``, mode 0640, group ``group`` when we may set it."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o640)
        if os.geteuid() == 0:
            os.chown(temp, 0, group)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
