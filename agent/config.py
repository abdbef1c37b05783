"""agent.toml, read into frozen dataclasses; any unknown key or bad value stops start-up.

Passwords are never in this file: each source names a `password_file`, read when a
backup starts, so the secret lives in one 0600 file the administrator controls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.schedule import parse_duration, parse_schedule
from common.compression import KINDS
from common.config import Table, load_toml, parse_host_port
from common.errors import ConfigError
from common.logsetup import DEFAULT_LOG_DIR

ENGINES = ("mysql", "mongodb", "postgresql")
DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}
FORMATS = {"mysql": "sql", "mongodb": "archive", "postgresql": "pgdump"}
# A PostgreSQL source's roles and tablespaces (`globals = true`) are backed up as this
# database: `_globals_<yyyymmdd>.pgsql.zst` sorts before every lower-case name.
PG_GLOBALS = "_globals"
DEFAULT_COLLECTOR_PORT = 2222
# `backhaul-agent run --stop-timeout`: how long a stopping service waits for its backups.
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_RETRY_FAILED = 2
DEFAULT_RETRY_INTERVAL = "10m"


def default_state_dir() -> Path:
    """systemd's StateDirectory when the service runs under it, else the packaged path."""
    return _systemd_dir("STATE_DIRECTORY", "/var/lib/backhaul/agent")


def default_run_dir() -> Path:
    """systemd's RuntimeDirectory when set, else the path the unit gives it, so that a
    one-shot command started from a shell finds the service's database locks."""
    return _systemd_dir("RUNTIME_DIRECTORY", "/run/backhaul-agent")


def _systemd_dir(variable: str, fallback: str) -> Path:
    # systemd joins several configured directories with ':'; the first is ours.
    value = os.environ.get(variable, "").split(":")[0]
    return Path(value) if value and os.path.isabs(value) else Path(fallback)
# A source without `schedule` is backed up daily at 01:00 local time plus a random delay
# of up to an hour, so that many database hosts installed alike do not all reach the
# collector at once. `schedule = "none"` leaves a source to `backhaul-agent backup`.
DEFAULT_SCHEDULE = "daily 01:00"
DEFAULT_RANDOM_DELAY = 3600.0
NO_SCHEDULE = "none"


@dataclass(frozen=True)
class SourceConfig:
    """One `[[sources]]` table: a database server and what to back up from it."""

    name: str
    engine: str
    databases: tuple[str, ...] | Literal["all"]
    host: str = "127.0.0.1"
    port: int = 3306
    socket: Path | None = None
    user: str | None = None
    password_file: Path | None = None
    uri: str | None = None
    compression: str = "zstd"
    compression_level: int | None = None
    stall_timeout: float = 600.0
    schedule: str | None = None
    random_delay: float = 0.0
    retry_failed: int = DEFAULT_RETRY_FAILED  # further attempts after a failed scheduled one
    retry_interval: float = 600.0  # seconds before the first of them; doubles after each
    catch_up: bool = True  # make up, once, a scheduled run missed while the service was down
    record_checksums: bool = False  # for drills; reads every table once more per backup
    default_schedule: bool = False  # schedule and random_delay are the defaults above
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return FORMATS[self.engine]


@dataclass(frozen=True)
class CollectorEndpoint:
    host: str
    port: int
    host_key: Path | None
    client_key: Path
    client_certificate: Path | None = None
    ca_public_key: Path | None = None
    connect_timeout: float = 30.0
    retries: int = 3  # extra attempts to reach the collector, with doubling waits
    retry_backoff: float = 5.0  # seconds before the first retry


@dataclass(frozen=True)
class AgentConfig:
    source_file: Path
    name: str
    collector: CollectorEndpoint
    log_dir: Path
    syslog: bool
    sources: tuple[SourceConfig, ...]
    max_concurrent: int = 1
    state_dir: Path = field(default_factory=default_state_dir)  # records of scheduled runs
    run_dir: Path = field(default_factory=default_run_dir)  # per-database locks

    def source(self, name: str) -> SourceConfig | None:
        return next((s for s in self.sources if s.name == name), None)


def load_agent_config(path: Path) -> AgentConfig:
    """Read and validate agent.toml.

    Raises:
        ConfigError: naming the file and the key at fault.
    """
    top = Table(load_toml(path), path)
    agent = top.table("agent", required=True)
    name = agent.text("name")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] in ".-":
        raise ConfigError(f"{agent.where('name')}: use letters, digits, '-', '_' and '.'")
    max_concurrent = agent.integer("max_concurrent", 1, low=1, high=64)
    state_dir = agent.path("state_dir", None) or default_state_dir()
    run_dir = agent.path("run_dir", None) or default_run_dir()
    agent.done()
    collector = _collector(top.table("collector", required=True))
    log = top.table("log")
    log_dir = log.path("dir", DEFAULT_LOG_DIR)
    syslog = log.flag("syslog", True)
    log.done()
    sources = tuple(_source(t) for t in top.tables("sources"))
    top.done()  # first: a misspelt [[source]] is named as such, not as "no sources"
    if not sources:
        raise ConfigError(f"{path}: no [[sources]] configured")
    names = [s.name for s in sources]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{path}: sources: the name {duplicate!r} appears twice")
    return AgentConfig(
        path, name, collector, log_dir, syslog, sources, max_concurrent, state_dir, run_dir
    )


def _collector(table: Table) -> CollectorEndpoint:
    host, port = parse_host_port(table.text("address"), table.where("address"),
                                 DEFAULT_COLLECTOR_PORT)
    endpoint = CollectorEndpoint(
        host=host,
        port=port,
        host_key=table.path("host_key", None),
        client_key=table.path("client_key"),
        client_certificate=table.path("client_certificate", None),
        ca_public_key=table.path("ca_public_key", None),
        connect_timeout=table.number("connect_timeout", 30.0, low=1),
        retries=table.integer("retries", 3, low=0, high=20),
        retry_backoff=table.number("retry_backoff", 5.0, low=0),
    )
    if endpoint.host_key is None and endpoint.ca_public_key is None:
        raise ConfigError(
            f"{table.where('host_key')} is required: the collector's host key must be pinned "
            "(or set ca_public_key to trust host certificates from the Backhaul CA)"
        )
    table.done()
    return endpoint


def _source(table: Table) -> SourceConfig:
    name = table.text("name")
    engine = table.text("engine", choices=ENGINES)
    raw = table.raw("databases")
    if raw == "all":
        databases: tuple[str, ...] | Literal["all"] = "all"
    elif isinstance(raw, list) and raw and all(isinstance(d, str) and d for d in raw):
        databases = tuple(raw)
    else:
        raise ConfigError(
            f"{table.where('databases')} must be \"all\" or a non-empty list of names"
        )
    is_server = engine in DEFAULT_PORTS  # a server reached by host and port or socket
    extra: dict[str, object] = {
        k: table.flag(k) for k in ("include_users_and_roles", "oplog") if table.has(k)
    }
    if engine == "postgresql":
        extra["globals"] = table.flag("globals", True)
        if extra["globals"] and databases != "all":  # "all" discovers it
            databases = (PG_GLOBALS, *(d for d in databases if d != PG_GLOBALS))
    default_schedule = not table.has("schedule")
    schedule = DEFAULT_SCHEDULE if default_schedule else _schedule(table)
    delay = DEFAULT_RANDOM_DELAY if default_schedule else 0.0
    source = SourceConfig(
        name=name,
        engine=engine,
        databases=databases,
        host=table.text("host", "127.0.0.1") if is_server else "",
        port=table.integer("port", DEFAULT_PORTS.get(engine, 0), low=1, high=65535)
        if is_server else 0,
        socket=table.path("socket", None) if is_server else None,
        user=table.text("user", None),
        password_file=table.path("password_file", None),
        uri=None if is_server else table.text("uri"),
        compression=table.text("compression", "zstd" if is_server else "gzip", choices=KINDS),
        compression_level=table.integer("compression_level", None, low=1, high=22),
        stall_timeout=table.number("stall_timeout", 600.0, low=1),
        schedule=schedule,
        random_delay=table.number("random_delay", delay, low=0),
        retry_failed=table.integer("retry_failed", DEFAULT_RETRY_FAILED, low=0, high=20),
        retry_interval=_duration(table, "retry_interval", DEFAULT_RETRY_INTERVAL),
        catch_up=table.flag("catch_up", True),
        record_checksums=table.flag("record_checksums", False) if engine == "mysql" else False,
        extra=extra,
        default_schedule=default_schedule,
    )
    if source.random_delay and source.schedule is None:
        raise ConfigError(f"{table.where('random_delay')} needs a schedule")
    if is_server and source.user is None:
        raise ConfigError(f"{table.where('user')} is required for a {engine} source")
    if source.uri is not None and "@" in urlsplit(source.uri).netloc:
        raise ConfigError(
            f"{table.where('uri')} must not contain credentials: use user and password_file"
        )
    table.done()
    return source


def _duration(table: Table, key: str, default: str) -> float:
    text: str = table.text(key, default)
    try:
        return float(parse_duration(text))
    except ValueError as exc:
        raise ConfigError(f"{table.where(key)}: {exc}") from None


def _schedule(table: Table) -> str | None:
    """The source's schedule, checked now so a typo stops start-up, not the 02:30 run."""
    text: str | None = table.text("schedule", None)
    if text is None or text == NO_SCHEDULE:
        return None
    try:
        parse_schedule(text)
    except ValueError as exc:
        raise ConfigError(f"{table.where('schedule')}: {exc}") from None
    return text
