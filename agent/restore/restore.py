"""`backhaul-agent restore`: bring one of this agent's backups back from the collector.

The newest backup of the database (of one day with ``--date``) is fetched over the
protocol and loaded into the source's server, into ``--into`` when given. A database
that already holds tables, views, routines, events or collections is refused unless
``--force``, which drops and recreates it once the backup has proven whole.

The backup crosses the network twice and the database host's disk never. The first
pass proves it whole before anything is touched: size and SHA-256 against the manifest
recorded when it was stored and against END, then the collector's own check
(:mod:`common.integrity`: the compressed stream decoded to its end, the dump's
completeness mark such as the SQL trailer or the archive's CRCs). The second pass
streams it into the database, checked the same way again. A backup damaged on the
collector is therefore refused with nothing loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

from agent.config import PG_GLOBALS, AgentConfig, SourceConfig
from agent.engines.adapters import MongoAdapter, MySQLAdapter, PostgresAdapter, adapter_for
from agent.link.connection import CollectorClient
from agent.link.requests import Fetched, fetch, list_backups
from agent.restore.mysql_schema import SchemaState
from agent.restore.sql_objects import SqlObjects
from agent.restore.targets import Loader, MongoLoader, MySQLLoader
from common.errors import BackhaulError, ConfigError, ExitCode, IntegrityError
from common.integrity import DEFAULT_MAX_RATIO, IntegrityChecker
from common.naming import EXTENSIONS, parse_backup_name
from common.text import escape_control

log = logging.getLogger(__name__)


class NoBackupError(BackhaulError):
    """The collector holds no backup that fits the request."""

    exit_code = ExitCode.FAILED
    reason = "no_backup"


class RestoreFailedError(BackhaulError):
    """A restore failed after it touched the target; says what became of the target.

    Exits as the failure that caused it would.
    """

    def __init__(self, cause: BackhaulError, outcome: str) -> None:
        super().__init__(f"{cause}; {outcome}")
        self.cause = cause
        self.exit_code = cause.exit_code

    @property
    def reason(self) -> str:
        """The cause's: a failed load is counted by what made it fail."""
        return self.cause.reason


class MeterFactory(Protocol):
    def __call__(self, label: str, total: int | None) -> Any: ...


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore, from the command line."""

    database: str
    source: str | None = None
    day: date | None = None
    into: str | None = None
    force: bool = False

    @property
    def target(self) -> str:
        return self.into if self.into is not None else self.database


@dataclass(frozen=True)
class RestoreOutcome:
    name: str
    target: str
    byte_count: int
    sha256: str
    uncompressed_bytes: int
    manifest: dict[str, Any]

    def line(self) -> str:
        return (
            f"restored {escape_control(self.name)} into {escape_control(self.target)} "
            f"({self.byte_count} bytes, sha256 {self.sha256})"
        )


def pick_source(config: AgentConfig, name: str | None) -> SourceConfig:
    """The source named, or the only one.

    Raises:
        ConfigError: unknown name, or several sources and no name.
    """
    if name is not None:
        source = config.source(name)
        if source is None:
            raise ConfigError(f"no source named {name!r} in {config.source_file}")
        return source
    if len(config.sources) > 1:
        raise ConfigError("--source is needed when several sources are configured")
    return config.sources[0]


def choose_backup(
    summaries: list[dict[str, Any]], database: str, engine: str, day: date | None = None
) -> dict[str, Any]:
    """The newest verified backup of ``database`` made by ``engine`` (on ``day``).

    ``summaries`` come from LIST, oldest first.

    Raises:
        NoBackupError: none fits; the message says what there is.
    """
    fitting = []
    for summary in summaries:
        parsed = parse_backup_name(str(summary.get("name", "")))
        if (
            parsed is None
            or summary.get("database") != database
            or summary.get("engine") != engine
            or not summary.get("verified")
        ):
            continue
        if day is None or parsed.day == day:
            fitting.append(summary)
    if fitting:
        return fitting[-1]
    label = escape_control(database)
    if day is not None:
        days = sorted(
            {
                p.day
                for s in summaries
                if (p := parse_backup_name(str(s.get("name", "")))) is not None
            }
        )
        shown = ", ".join(f"{d:%Y%m%d}" for d in days[-5:]) or "none"
        raise NoBackupError(
            f"no {engine} backup of {label} from {day:%Y%m%d} on the "
            f"collector (latest days: {shown})"
        )
    raise NoBackupError(f"no {engine} backup of {label} on the collector")


def loader_for(source: SourceConfig, *, skip_binlog: bool = False) -> Loader:
    """The loader for a source's engine.

    Raises:
        DumpError: the password file cannot be read.
    """
    adapter = adapter_for(source)
    if isinstance(adapter, MySQLAdapter):
        return MySQLLoader(adapter.params, skip_binlog=skip_binlog)
    if isinstance(adapter, PostgresAdapter):
        from agent.restore.pg_loader import PostgresLoader

        return PostgresLoader(adapter.params)
    assert isinstance(adapter, MongoAdapter)
    return MongoLoader(adapter.params)


async def restore(
    config: AgentConfig,
    request: RestoreRequest,
    client: CollectorClient,
    meter: MeterFactory | None = None,
) -> RestoreOutcome:
    """Restore the newest fitting backup as the request says.

    Raises:
        ConfigError: bad source, or the target holds something and ``force`` is off.
        NoBackupError: the collector has no fitting backup.
        IntegrityError: the backup is damaged (nothing loaded when found in the first pass).
        DumpError: the database server or its client failed.
        TransportError, RejectedError, RemoteProtocolError: talking to the collector failed.
    """
    source = pick_source(config, request.source)
    if source.engine == "postgresql" and request.database == PG_GLOBALS and request.into:
        raise ConfigError("the globals (roles, tablespaces) belong to the whole server: "
                          "restore them without --into")
    loader = loader_for(source)
    target = request.target
    loader.check_name(target)
    summary = choose_backup(
        await list_backups(client, request.database), request.database, source.engine, request.day
    )
    state = await loader.state(target)
    occupied = state.exists and state.objects > 0
    if occupied and not request.force:
        raise ConfigError(
            f"database {escape_control(target)!r} on source {source.name} already holds "
            f"{state.objects} object(s); restore elsewhere with --into, or replace it "
            "with --force"
        )
    return await restore_backup(client, summary, loader, target, replace=occupied, meter=meter)


async def restore_backup(
    client: CollectorClient,
    summary: dict[str, Any],
    loader: Loader,
    target: str,
    *,
    replace: bool,
    meter: MeterFactory | None = None,
) -> RestoreOutcome:
    """Verify the backup ``summary`` names end to end, then load it into ``target``.

    ``replace`` drops and recreates an existing ``target`` after verification.

    Raises:
        As :func:`restore`.
    """
    name = str(summary["name"])
    verified, objects = await _verify(client, summary, meter)
    log.info("%s verified: %d bytes, sha256 %s", name, verified.byte_count, verified.sha256)
    await loader.check_privileges(target, objects)
    before = await loader.state(target)
    await loader.prepare(target, replace=replace)
    try:
        loaded, output_bytes = await _load(client, summary, loader, target, meter)
        if loaded.sha256 != verified.sha256:
            raise IntegrityError(f"{name} changed on the collector between verifying and loading")
    except BaseException as exc:
        outcome = await _undo(loader, target, before, replace)
        if isinstance(exc, BackhaulError):
            raise RestoreFailedError(exc, outcome) from exc
        raise
    log.info("%s loaded into %r", name, target)
    return RestoreOutcome(
        name, target, loaded.byte_count, loaded.sha256, output_bytes, loaded.manifest
    )


async def _verify(
    client: CollectorClient, summary: dict[str, Any], meter: MeterFactory | None
) -> tuple[Fetched, SqlObjects]:
    """The first pass: the whole backup fetched and checked, nothing loaded; also what an
    SQL dump creates besides tables, so the privileges it needs are checked before loading.

    Raises:
        IntegrityError: the backup or its manifest is damaged.
        TransportError, RejectedError, RemoteProtocolError: the fetch failed.
    """
    name, database = str(summary["name"]), str(summary["database"])
    fmt, compression = _kind(name)
    objects = SqlObjects()
    checker = IntegrityChecker(
        fmt, compression, DEFAULT_MAX_RATIO, sink=objects.feed if fmt == "sql" else None
    )

    async def check(chunk: bytes) -> None:
        await asyncio.to_thread(checker.feed, chunk)

    verified = await fetch(
        client, database, name, check, progress=_advance(meter, f"verifying {name}", summary)
    )
    checker.finish(verified.byte_count, verified.sha256)
    _check_manifest(verified, summary, fmt, compression)
    return verified, objects


async def _load(
    client: CollectorClient,
    summary: dict[str, Any],
    loader: Loader,
    target: str,
    meter: MeterFactory | None,
) -> tuple[Fetched, int]:
    """The second pass: the backup fetched again into ``target``, checked the same way;
    what was fetched and how many bytes it decompressed to.

    Raises:
        As :func:`restore`.
    """
    name, database = str(summary["name"]), str(summary["database"])
    pieces: list[bytes] = []
    checker = IntegrityChecker(*_kind(name), DEFAULT_MAX_RATIO, sink=pieces.append)
    async with loader.load(target) as sink:

        async def take(chunk: bytes) -> None:
            await asyncio.to_thread(checker.feed, chunk)
            for piece in pieces:
                await sink.write(piece)
            pieces.clear()

        loaded = await fetch(
            client, database, name, take, progress=_advance(meter, f"loading {name}", summary)
        )
        facts = checker.finish(loaded.byte_count, loaded.sha256)
        await sink.finish()
    return loaded, int(facts["uncompressed_bytes"])


async def _undo(loader: Loader, target: str, before: SchemaState, replace: bool) -> str:
    """Leave no half-restored database: drop what this restore created or replaced, and
    empty again a database that was empty. Returns what was done, for the message."""
    label = escape_control(target)
    try:
        if before.exists and not replace:
            await loader.drop(target)
            await loader.prepare(target, replace=False)
            done = f"database {label!r} emptied again, as it was before the restore"
        else:
            await loader.drop(target)
            done = (f"database {label!r}, which this restore created, dropped again"
                    if not before.exists else
                    f"database {label!r} dropped: --force had replaced it, and the old "
                    "content is gone; restore another backup into it")
    except BackhaulError as exc:
        done = f"database {label!r} may hold part of the backup: cleaning it failed: {exc}"
        log.error("restore into %r failed; %s", target, done)
        return done
    log.error("restore into %r failed; %s", target, done)
    return done


def _advance(
    meter: MeterFactory | None, label: str, summary: dict[str, Any]
) -> Callable[[int], None] | None:
    if meter is None:
        return None
    size = summary.get("size")
    progress = meter(label, size if isinstance(size, int) else None)
    advance: Callable[[int], None] = progress.advance
    return advance


def _kind(name: str) -> tuple[str, str]:
    parsed = parse_backup_name(name)
    kinds = {ext: kind for kind, ext in EXTENSIONS.items()}
    if parsed is None or parsed.ext not in kinds:
        raise IntegrityError(f"{name!r} is not the name of a backup")
    return kinds[parsed.ext]


def _check_manifest(fetched: Fetched, summary: dict[str, Any], fmt: str, compression: str) -> None:
    manifest = fetched.manifest
    if summary.get("sha256") not in (None, fetched.sha256):
        raise IntegrityError(f"{fetched.name}: its manifest changed since it was listed")
    if (
        manifest.get("format", fmt) != fmt
        or manifest.get("compression", compression) != compression
    ):
        raise IntegrityError(f"{fetched.name}: its manifest does not match its name")
