"""The `[[offsite]]` tables of collector.toml: one S3-compatible target each, checked strictly.

The secret access key is read from its file by the project's one secret-file rule
(common.credentials.read_secret_file) when the target is opened, never kept in the
config object's repr, and never put in argv, environment or logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from collector.offsite.age_stream import read_recipients
from common.config import Table
from common.credentials import read_secret_file
from common.errors import ConfigError

LOCK_MODES = ("compliance", "governance")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?/s\s*$")
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@dataclass(frozen=True)
class OffsiteTarget:
    """One `[[offsite]]` table."""

    name: str
    endpoint: str
    region: str
    bucket: str
    access_key_id: str
    secret_access_key_file: Path
    recipients_file: Path
    prefix: str = ""
    lock_mode: str | None = None
    lock_days: int = 0
    prune: bool = False
    max_rate: int | None = None  # bytes per second; None = unlimited
    concurrency: int = 1  # backups copied at once to this target
    part_size: int = 8 * 2**20
    where: str = field(default="", compare=False)  # "collector.toml: offsite[0]." for messages

    def secret_access_key(self) -> str:
        """Read the secret key file (0600, one line).

        Raises:
            ConfigError: missing, unsafe or malformed file, named with its setting.
        """
        return read_secret_file(self.secret_access_key_file,
                                f"{self.where}secret_access_key_file")


def parse_rate(text: str, where: str) -> int:
    """"20MiB/s" → 20971520 bytes per second.

    Raises:
        ConfigError: not a positive rate with a known unit.
    """
    match = _RATE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{where} must be a rate such as \"20MiB/s\" or \"500KB/s\"")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2)]))


def parse_offsite(tables: list[Table]) -> tuple[OffsiteTarget, ...]:
    """Read every `[[offsite]]` table.

    Raises:
        ConfigError: naming the file and key at fault.
    """
    targets = tuple(_target(t) for t in tables)
    names = [t.name for t in targets]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{tables[0].source}: offsite: the name {duplicate!r} appears twice")
    return targets


def _target(table: Table) -> OffsiteTarget:
    name = table.text("name")
    if not _NAME.match(name):
        raise ConfigError(f"{table.where('name')}: use letters, digits, '-' and '_' (64 at most)")
    endpoint = table.text("endpoint")
    if not endpoint.startswith(("https://", "http://")):
        raise ConfigError(f"{table.where('endpoint')} must start with https:// or http://")
    prefix = table.text("prefix", "")
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(f"{table.where('prefix')} must be relative and without '..'")
    lock_mode = table.text("lock_mode", None, choices=LOCK_MODES)
    lock_days = table.integer("lock_days", 0, low=0, high=36500)
    if lock_mode is not None and lock_days < 1:
        raise ConfigError(f"{table.where('lock_days')} must be at least 1 with lock_mode")
    if lock_mode is None and lock_days:
        raise ConfigError(f"{table.where('lock_days')} needs lock_mode")
    rate_text = table.text("max_rate", None)
    target = OffsiteTarget(
        name=name,
        endpoint=endpoint.rstrip("/"),
        region=table.text("region", "us-east-1"),
        bucket=table.text("bucket"),
        access_key_id=table.text("access_key_id"),
        secret_access_key_file=table.path("secret_access_key_file"),
        recipients_file=table.path("recipients_file"),
        prefix=prefix,
        lock_mode=lock_mode,
        lock_days=lock_days,
        prune=table.flag("prune", False),
        max_rate=parse_rate(rate_text, table.where("max_rate")) if rate_text else None,
        concurrency=table.integer("concurrency", 1, low=1, high=16),
        part_size=table.integer("part_size_mib", 8, low=5, high=512) * 2**20,
        where=f"{table.source}: {table.prefix}",
    )
    table.done()
    if not target.bucket:
        raise ConfigError(f"{table.where('bucket')} must not be empty")
    target.secret_access_key()  # fail at start, not at the first copy
    read_recipients(target.recipients_file, table.where("recipients_file"))
    return target
