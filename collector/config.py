"""collector.toml, read into frozen dataclasses; any unknown key or bad value stops start-up."""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import asyncssh

from collector.offsite.config import OffsiteTarget, parse_offsite
from collector.report.expectations import AgentExpectations, parse_agent_expectations
from collector.report.notify import NotifyConfig, parse_notify_config
from collector.store.retention import RetentionPolicy, parse_retention
from common.config import Table, load_toml, parse_host_port
from common.credentials import check_secret_file
from common.errors import ConfigError
from common.integrity import DEFAULT_MAX_RATIO
from common.logsetup import DEFAULT_LOG_DIR

DEFAULT_PORT = 2222
# Agents enrolled with `backhaul-collector enrol-agent`: one NAME.toml per agent (the keys
# of an [[agents]] table) in this folder beside collector.toml, read with the file.
AGENTS_DIR = "agents.d"


@dataclass(frozen=True)
class AgentEntry:
    """One `[[agents]]` table: who may connect, with which key, sending what."""

    name: str
    public_key: Path | None
    databases: tuple[str, ...] | None  # allow-list and expected set; None = any
    max_backup_bytes: int | None = None
    expectations: AgentExpectations = field(default_factory=AgentExpectations)


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    host_key: Path
    host_certificate: Path | None = None
    ca_public_key: Path | None = None
    revocation_list: Path | None = None
    login_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_connections: int = 200
    max_connections_per_agent: int = 8
    max_unauthenticated_per_address: int = 0  # handshakes in progress per address; 0: no cap
    max_channels_per_connection: int = 16
    clock_skew: float = 600.0
    handshake_timeout: float = 30.0  # channel open to HELLO + request
    min_upload_rate: int = 1024  # bytes/s over min_upload_rate_window; 0 = off
    min_upload_rate_window: float = 60.0


@dataclass(frozen=True)
class StorageConfig:
    root: Path
    timezone_name: str = "local"
    max_backup_bytes: int | None = None  # compressed size cap per backup; None = no cap
    max_expansion: int = DEFAULT_MAX_RATIO  # max expanded/compressed ratio tolerated at verify

    @property
    def timezone(self) -> tzinfo:
        return resolve_timezone(self.timezone_name)


@dataclass(frozen=True)
class LogConfig:
    dir: Path = DEFAULT_LOG_DIR
    syslog: bool = True
    level: str = "info"


@dataclass(frozen=True)
class CollectorConfig:
    source: Path
    server: ServerConfig
    storage: StorageConfig
    log: LogConfig
    agents: tuple[AgentEntry, ...]
    metrics_listen: tuple[str, int] | None = None
    notify: NotifyConfig | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    offsite: tuple[OffsiteTarget, ...] = ()

    def agent(self, name: str) -> AgentEntry | None:
        return next((a for a in self.agents if a.name == name), None)


def resolve_timezone(name: str) -> tzinfo:
    """"local", "UTC" or an IANA name.

    Raises:
        ConfigError: unknown zone.
    """
    if name == "local":
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC
    if name.upper() == "UTC":
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r}") from None


def load_collector_config(path: Path) -> CollectorConfig:
    """Read and validate collector.toml.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    top = Table(load_toml(path), path)
    server = _server(top.table("server", required=True))
    storage = _storage(top.table("storage", required=True))
    log_table = top.table("log")
    log = LogConfig(
        dir=log_table.path("dir", DEFAULT_LOG_DIR),
        syslog=log_table.flag("syslog", True),
        level=log_table.text("level", "info", choices=("debug", "info", "warning", "error")),
    )
    log_table.done()
    agents = tuple(_agent(t, server) for t in top.tables("agents"))
    agents += tuple(_agent(t, server) for t in _agent_dropins(agents_dir(path)))
    names = [a.name for a in agents]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{path}: agents: the name {duplicate!r} appears twice "
                          f"(in [[agents]] or {agents_dir(path)})")
    metrics = top.table("metrics")
    metrics_listen = None
    if metrics.has("listen"):
        metrics_listen = parse_host_port(metrics.text("listen"), metrics.where("listen"))
    metrics.done()
    notify = parse_notify_config(top.table("notify")) if top.has("notify") else None
    retention_table = top.raw("retention", {})
    if not isinstance(retention_table, dict):
        raise ConfigError(f"{top.where('retention')} must be a table")
    retention = parse_retention(retention_table, str(path))
    offsite = parse_offsite(top.tables("offsite"))
    top.done()
    return CollectorConfig(path, server, storage, log, agents, metrics_listen, notify, retention,
                           offsite)


def agents_dir(config_path: Path) -> Path:
    """The drop-in folder of enrolled agents that belongs to this collector.toml."""
    return config_path.parent / AGENTS_DIR


def _agent_dropins(folder: Path) -> list[Table]:
    """One table per ``*.toml`` in the drop-in folder, in name order; none if it is absent.

    Raises:
        ConfigError: the folder or a file in it cannot be read or parsed.
    """
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".toml")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot read the agents folder: {exc.strerror}") from None
    return [Table(load_toml(file), file) for file in files]


def _server(table: Table) -> ServerConfig:
    host, port = parse_host_port(
        table.text("listen", f"0.0.0.0:{DEFAULT_PORT}"), table.where("listen"), DEFAULT_PORT
    )
    config = ServerConfig(
        host=host,
        port=port,
        host_key=table.path("host_key"),
        host_certificate=table.path("host_certificate", None),
        ca_public_key=table.path("ca_public_key", None),
        revocation_list=table.path("revocation_list", None),
        login_timeout=table.number("login_timeout", 30.0, low=1),
        idle_timeout=table.number("idle_timeout", 300.0, low=1),
        max_connections=table.integer("max_connections", 200, low=1),
        max_connections_per_agent=table.integer("max_connections_per_agent", 8, low=1),
        max_unauthenticated_per_address=table.integer("max_unauthenticated_per_address", 0,
                                                      low=0),
        max_channels_per_connection=table.integer("max_channels_per_connection", 16, low=1),
        clock_skew=table.number("clock_skew", 600.0, low=0),
        handshake_timeout=table.number("handshake_timeout", 30.0, low=1),
        min_upload_rate=table.integer("min_upload_rate", 1024, low=0),
        min_upload_rate_window=table.number("min_upload_rate_window", 60.0, low=0.1),
    )
    table.done()
    _check_private_key(config.host_key, table.where("host_key"))
    return config


def _storage(table: Table) -> StorageConfig:
    max_bytes = table.integer("max_backup_bytes", 0)
    config = StorageConfig(
        root=table.path("root"),
        timezone_name=table.text("timezone", "local"),
        max_backup_bytes=max_bytes or None,
        max_expansion=table.integer("max_expansion", DEFAULT_MAX_RATIO, low=10),
    )
    table.done()
    try:
        resolve_timezone(config.timezone_name)
    except ConfigError as exc:
        raise ConfigError(f"{table.where('timezone')}: {exc}") from None
    return config


def _agent(table: Table, server: ServerConfig) -> AgentEntry:
    name = table.text("name")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] in ".-":
        raise ConfigError(
            f"{table.where('name')}: agent names use letters, digits, '-', '_' and '.' "
            "and do not start with '.' or '-'"
        )
    public_key = table.path("public_key", None)
    if public_key is None and server.ca_public_key is None:
        raise ConfigError(
            f"{table.where('public_key')} is required (or set server.ca_public_key)"
        )
    if public_key is not None:
        try:
            asyncssh.read_public_key(str(public_key))
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"{table.where('public_key')}: cannot read {public_key}: {exc}") \
                from None
    databases = table.str_list("databases", None)
    max_bytes = table.integer("max_backup_bytes", 0)
    expected = {key: table.raw(key) for key in _EXPECTATION_KEYS if table.has(key)}
    expectations = parse_agent_expectations(expected, databases, table.where(""))
    table.done()
    return AgentEntry(name, public_key, databases, max_bytes or None, expectations)


_EXPECTATION_KEYS = ("expected_interval", "shrink_factor", "expected_intervals")


def _check_private_key(path: Path, where: str) -> None:
    check_secret_file(path, "private key", where)
    try:
        asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read private key {path}: {exc}") from None
