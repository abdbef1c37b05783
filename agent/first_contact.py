"""The files agent.toml points at, checked before anything runs: present and private.

agent.toml itself is parsed without touching them (:mod:`agent.config`); this is the
step `check-config` and every command take next, so that a first install's mistakes
show at once with their fix, not at the first backup in the night: a missing client key
or pinned collector key, and a key or password file that others may read.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig
from common.credentials import check_secret_file
from common.errors import ConfigError


def check_agent_files(config: AgentConfig) -> None:
    """Raise on the first file of ``config`` that is missing or too open.

    Raises:
        ConfigError: naming the file, the key that points at it, and the fix.
    """
    where = f"{config.source_file}: collector."
    collector = config.collector
    check_secret_file(collector.client_key, "private key", f"{where}client_key")
    pinned: list[tuple[str, Path | None]] = [("host_key", collector.host_key),
                                             ("ca_public_key", collector.ca_public_key)]
    for key, path in pinned:
        if path is not None and not path.is_file():
            raise ConfigError(
                f"{where}{key}: {path} does not exist; copy the collector's public host key "
                "there (the collector's install.sh printed it)"
            )
    for index, source in enumerate(config.sources):
        if source.password_file is not None:
            check_secret_file(source.password_file, "password file",
                              f"{config.source_file}: sources[{index}].password_file")
