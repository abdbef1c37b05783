"""A compromised database host can add new backups for its own databases and nothing else.

Every test logs in to a real collector (in this process, on 127.0.0.1) with a real listed
key or CA certificate and then misbehaves. Each checks: a clear REJECT code (or a refusal
where SSH itself says no), a log line naming the agent and its address, no file left
behind (no final name, no temporary), bounded memory (this process's peak RSS, since the
collector runs here), and that a legitimate backup by another agent still lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import zstandard
from asyncssh.packet import String

from agent.config import load_agent_config
from agent.link.connection import Channel, CollectorClient
from certs import ca
from collector.config import ServerConfig, load_collector_config
from collector.report.outcomes import FanOut
from collector.serve.context import SessionContext
from collector.serve.server import CollectorServer, make_context
from common.errors import ConfigError, RejectedError, TransportError
from common.events import (
    Begin,
    Data,
    End,
    Event,
    Fetch,
    FetchMeta,
    Hello,
    Listing,
    ListRequest,
    Reject,
    Stored,
    decode_payload,
)
from common.frames import (
    DEFAULT_DATA_PAYLOAD,
    HEADER,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from common.identity import key_fp, known_hosts_for
from common.logsetup import setup_logging
from common.naming import encode_database
from common.protocol import SUBSYSTEM
from common.revocation import RevocationEntry
from tests.integration.harness import Deployment, log_text, stored_files

pytestmark = pytest.mark.integration

MEMORY_LIMIT_MIB = 48  # peak RSS growth allowed while one hostile client is served
TRAILER = b"\n-- Dump completed on 2026-11-26  1:30:00\n"
SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}
HELLO_JSON: dict[str, Any] = {"versions": [1], "max_data": 256 * 1024, "software": "test"}


# --- a real collector, tuned per test ------------------------------------------------------


@dataclasses.dataclass
class Collector:
    """A running collector and the deployment behind it."""

    deployment: Deployment
    server: CollectorServer
    ctx: SessionContext

    @property
    def port(self) -> int:
        return int(self.server.port)

    @property
    def store(self) -> Path:
        return self.deployment.store

    def log(self) -> str:
        return log_text(self.deployment.collector_logs)

    async def connect(self, agent: str = "db1", key: Any = None) -> Agent:
        return await connect(self.port, self.deployment, agent, key)


@dataclasses.dataclass
class Agent:
    """An SSH connection as an agent, and the address the collector sees it from."""

    conn: asyncssh.SSHClientConnection
    name: str
    peer: str

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 10)


async def connect(port: int, deployment: Deployment, agent: str, key: Any = None) -> Agent:
    """Log in as ``agent`` (its listed key unless ``key``) from a socket we know the port of."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    host, local_port = sock.getsockname()
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        conn = await asyncssh.connect(
            sock=sock,
            host="127.0.0.1",
            port=port,
            username=agent,
            client_keys=[key if key is not None else str(deployment.agents[agent])],
            known_hosts=known_hosts_for(
                "127.0.0.1", port, deployment.host_key.with_suffix(".pub"), None
            ),
            x509_trusted_certs=None,
            agent_path=None,
            config=[],
            preferred_auth="publickey",
            connect_timeout=10,
        )
    except BaseException:
        sock.close()
        raise
    return Agent(conn, agent, f"{host}:{local_port}")


@contextlib.asynccontextmanager
async def collector(
    deployment: Deployment,
    *,
    server: str = "login_timeout = 5\nidle_timeout = 10",
    storage: str = "",
    agents: dict[str, str] | None = None,
    extra: str = "",
    **tuning: Any,
) -> AsyncIterator[Collector]:
    """Start CollectorServer on 127.0.0.1:0 with this process's event loop.

    ``tuning`` names `[server]` settings; those collector.toml does not know yet are set
    on the session context instead, exactly where make_context would put them.
    """
    in_toml = "".join(f"\n{k} = {v!r}" for k, v in tuning.items() if k in SERVER_FIELDS)
    path = deployment.collector_toml(
        server_extra=server + in_toml, storage_extra=storage, agent_extra=agents, extra=extra
    )
    config = load_collector_config(path)
    setup_logging("backhaul-collector", config.log.dir, use_syslog=False)
    ctx = make_context(config, FanOut())
    for key, value in tuning.items():
        if key not in SERVER_FIELDS:
            setattr(ctx, key, value)
    ctx.store.ensure_root()
    server_ = CollectorServer(config, ctx)
    await server_.start()
    try:
        yield Collector(deployment, server_, ctx)
    finally:
        await server_.stop(drain_timeout=5)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    deployment = Deployment(tmp_path)
    deployment.add_agent("db1")
    deployment.add_agent("db2")
    return deployment


@pytest.fixture
async def running(deployment: Deployment) -> AsyncIterator[Collector]:
    async with collector(deployment) as c:
        yield c


# --- what every test checks ----------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    raise AssertionError(f"{field} not in /proc/self/status")


@contextlib.contextmanager
def bounded_memory(limit_mib: int = MEMORY_LIMIT_MIB) -> Iterator[None]:
    """Peak RSS of this process (the collector's) grows by less than ``limit_mib``."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back: no hidden reuse
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        field = "VmHWM"
    except OSError:
        field = "VmRSS"
    yield
    grown = (_status(field) - before) / 1024
    assert grown < limit_mib, f"RSS grew by {grown:.0f} MiB"


def files_of(store: Path, agent: str) -> list[Path]:
    """Every file of ``agent`` in the store, temporaries included."""
    folder = store / agent
    return stored_files(folder) if folder.exists() else []


async def logged(
    c: Collector, *needles: str, any_of: tuple[str, ...] = (), timeout: float = 10
) -> str:
    """The first collector log line holding every needle and, if given, one of ``any_of``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in c.log().splitlines():
            if all(n in line for n in needles) and (not any_of or any(a in line for a in any_of)):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {needles}:\n{c.log()[-3000:]}")
        await asyncio.sleep(0.05)


async def still_serves_others(c: Collector, agent: str = "db2") -> None:
    """A legitimate backup right after lands intact, read-only, under its final name."""
    database = f"ok_{os.urandom(3).hex()}"
    payload = sql_dump(os.urandom(4096).hex().encode())
    async with await c.connect(agent) as a:
        stored = await backup(a, database, payload)
    path = c.store / agent / encode_database(database) / stored.name
    assert path.read_bytes() == payload
    assert path.stat().st_mode & 0o777 == 0o440


async def contained(
    c: Collector, agent: Agent, *log_words: str, any_of: tuple[str, ...] = ()
) -> None:
    """The checks after a hostile request: logged with its identity, no file, others served."""
    assert log_words or any_of, "the agent's login line alone proves nothing"
    await logged(c, agent.name, agent.peer, *log_words, any_of=any_of)
    assert files_of(c.store, agent.name) == []
    await still_serves_others(c)


# --- the agent's side, by the book and by hand ------------------------------------------------


def now_iso(offset: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat(timespec="seconds")


def sql_dump(body: bytes = b"SELECT 1;", compression: str = "zstd") -> bytes:
    text = b"-- MariaDB dump 10.19\n" + body + TRAILER
    if compression == "gzip":
        obj = zlib.compressobj(6, zlib.DEFLATED, 31)
        return obj.compress(text) + obj.flush()
    return bytes(zstandard.ZstdCompressor(level=3).compress(text))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FRESH = "(the time it is sent)"  # cases are built at import, long before they run


def begin_json(database: Any = "hospital", **fields: Any) -> dict[str, Any]:
    return {
        "database": database,
        "engine": "mysql",
        "format": "sql",
        "compression": "zstd",
        "started_at": FRESH,
        "size_estimate": None,
        "source": "main",
        **fields,
    }


def fresh(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "started_at": now_iso()} if obj.get("started_at") == FRESH else obj


async def open_channel(agent: Agent) -> Channel:
    """A channel as the real agent opens it (agent.link.connection.Channel), HELLOs exchanged."""
    writer, reader, _ = await agent.conn.open_session(subsystem=SUBSYSTEM, encoding=None)
    channel = Channel(writer, reader)
    await channel.handshake()
    return channel


async def backup(agent: Agent, database: str, payload: bytes, compression: str = "zstd") -> Stored:
    """One backup exactly as the agent sends it; raises RejectedError on REJECT."""
    channel = await open_channel(agent)
    try:
        await channel.send(Begin(**fresh(begin_json(database, compression=compression))))
        for start in range(0, len(payload), channel.max_data):
            await channel.send(Data(payload[start : start + channel.max_data]))
        await channel.send(End(len(payload), sha256(payload), {"tool": "test"}))
        stored = await channel.expect(Stored, timeout=30)
    finally:
        channel.close()
    assert isinstance(stored, Stored)
    return stored


class Wire:
    """One `backhaul` channel driven by hand: any bytes out, the collector's frames back."""

    def __init__(
        self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]
    ) -> None:
        self.writer = writer
        self.reader = reader
        self.decoder = FrameDecoder(MAX_DATA_PAYLOAD)

    @classmethod
    async def open(cls, agent: Agent) -> Wire:
        writer, reader, _ = await agent.conn.open_session(subsystem=SUBSYSTEM, encoding=None)
        return cls(writer, reader)

    async def write(self, data: bytes) -> bool:
        """False once the collector has closed the channel."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (asyncssh.Error, OSError):
            return False
        return True

    async def frame(self, kind: FrameType | int, payload: bytes | dict[str, Any]) -> bool:
        if isinstance(payload, dict):
            payload = json.dumps(fresh(payload)).encode()
        return await self.write(HEADER.pack(kind, len(payload)) + payload)

    async def hello(self, **fields: Any) -> Hello:
        await self.frame(FrameType.HELLO, HELLO_JSON | fields)
        event = await self.event()
        assert isinstance(event, Hello), event
        return event

    async def event(self, timeout: float = 30) -> Event | None:
        """The collector's next frame, or None when it closed the channel."""
        async with asyncio.timeout(timeout):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return decode_payload(frame.type, frame.payload)
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)

    async def upload(self, database: str, payload: bytes, **begin: Any) -> Event | None:
        """BEGIN, DATA…, END written without waiting; returns the verdict."""
        await self.frame(FrameType.BEGIN, begin_json(database, **begin))
        for start in range(0, len(payload), DEFAULT_DATA_PAYLOAD):
            if not await self.frame(FrameType.DATA, payload[start : start + DEFAULT_DATA_PAYLOAD]):
                break
        else:
            await self.frame(FrameType.END, {"byte_count": len(payload), "sha256": sha256(payload)})
        return await self.event()

    def close(self) -> None:
        self.writer.channel.close()


def rejected(event: Event | None, code: str) -> Reject:
    assert isinstance(event, Reject), f"expected REJECT {code}, got {event}"
    assert event.code == code, event
    return event


# --- malformed, out of order, oversized, unknown versions -----------------------------------

Script = Callable[[Wire], Awaitable[None]]


def frames(*items: tuple[int, bytes | dict[str, Any]], hello: bool = True) -> Script:
    async def run(wire: Wire) -> None:
        if hello:
            await wire.hello()
        for kind, payload in items:
            await wire.frame(kind, payload)

    return run


def raw(data: bytes, *, hello: bool = True, eof: bool = False) -> Script:
    async def run(wire: Wire) -> None:
        if hello:
            await wire.hello()
        await wire.write(data)
        if eof:
            wire.writer.write_eof()

    return run


def hello_with(**fields: Any) -> Script:
    async def run(wire: Wire) -> None:
        await wire.frame(FrameType.HELLO, HELLO_JSON | fields)

    return run


B, D, E, H = FrameType.BEGIN, FrameType.DATA, FrameType.END, FrameType.HELLO
GOOD = sql_dump()
GOOD_END = {"byte_count": len(GOOD), "sha256": sha256(GOOD)}
PLAIN = b"-- MariaDB dump, not compressed" + TRAILER
HALF = bytes(zstandard.ZstdCompressor().compress(b"-- MariaDB dump 10.19\nINSERT INTO t"))


def huge_data_header() -> Script:
    async def run(wire: Wire) -> None:
        await wire.hello()
        await wire.frame(B, begin_json())
        await wire.write(HEADER.pack(D, 0x7FFFFFFF) + b"\0" * 1024)

    return run


HOSTILE: dict[str, tuple[Script, str]] = {
    # malformed
    "garbage instead of a frame": (raw(b"SSH-2.0-OpenSSH_9.6\r\n" * 4, hello=False), "protocol"),
    "unknown frame type": (raw(b"\x7f\x00\x00\x00\x00"), "protocol"),
    "payload not JSON": (frames((B, b"{oops")), "protocol"),
    "payload not an object": (frames((B, b"[1, 2]")), "protocol"),
    "payload not UTF-8": (frames((B, b'{"database": "\xff\xfe"}')), "protocol"),
    "deeply nested JSON": (frames((B, b"[" * 60_000)), "protocol"),
    "field of the wrong type": (frames((B, begin_json(database=7))), "protocol"),
    "missing field": (frames((B, {"database": "x"})), "protocol"),
    "integer out of range": (frames((B, begin_json(size_estimate=10**30))), "protocol"),
    "boolean as integer": (frames((B, begin_json(size_estimate=True))), "protocol"),
    "bad sha256 in END": (
        frames((B, begin_json()), (D, GOOD), (E, {"byte_count": len(GOOD), "sha256": "x" * 64})),
        "protocol",
    ),
    "frame cut by EOF": (raw(b"\x10\x00\x00\x01\x00{", eof=True), "protocol"),
    "wrong byte count": (
        frames((B, begin_json()), (D, GOOD), (E, {**GOOD_END, "byte_count": 1})),
        "integrity",
    ),
    "wrong checksum": (
        frames((B, begin_json()), (D, GOOD), (E, {**GOOD_END, "sha256": "0" * 64})),
        "integrity",
    ),
    "not a compressed stream": (
        frames(
            (B, begin_json()), (D, PLAIN), (E, {"byte_count": len(PLAIN), "sha256": sha256(PLAIN)})
        ),
        "integrity",
    ),
    "dump without its trailer": (
        frames(
            (B, begin_json()), (D, HALF), (E, {"byte_count": len(HALF), "sha256": sha256(HALF)})
        ),
        "integrity",
    ),
    # wrong order
    "BEGIN before HELLO": (frames((B, begin_json()), hello=False), "protocol"),
    "DATA before BEGIN": (frames((D, b"x")), "protocol"),
    "END before BEGIN": (frames((E, GOOD_END)), "protocol"),
    "a second HELLO": (frames((H, HELLO_JSON)), "protocol"),
    "BEGIN twice": (frames((B, begin_json()), (B, begin_json())), "protocol"),
    "a collector's frame": (
        frames((FrameType.STORED, {"name": "x", "sha256": "0" * 64, "size": 1})),
        "protocol",
    ),
    "REJECT from the agent": (frames((FrameType.REJECT, {"code": "x", "reason": "y"})), "protocol"),
    # oversized frames and metadata
    "DATA length of 2 GiB": (huge_data_header(), "too_large"),
    "control frame over its cap": (
        raw(HEADER.pack(B, MAX_CONTROL_PAYLOAD + 1) + b"{" * 4096),
        "too_large",
    ),
    "DATA over the negotiated size": (
        frames((B, begin_json()), (D, b"\0" * (DEFAULT_DATA_PAYLOAD + 1))),
        "too_large",
    ),
    "database name over 256 characters": (frames((B, begin_json("x" * 300))), "protocol"),
    "metadata over its cap": (
        frames((B, begin_json()), (D, GOOD), (E, {**GOOD_END, "metadata": {"x": "y" * 40_000}})),
        "too_large|protocol",  # errors.py files metadata under too_large; events.py: protocol
    ),
    "ABORT reason over its cap": (
        frames((B, begin_json()), (FrameType.ABORT, {"reason": "r" * 5000})),
        "protocol",
    ),
    # versions
    "unknown protocol version": (hello_with(versions=[99]), "protocol"),
    "no protocol version": (hello_with(versions=[]), "protocol"),
    "seventeen versions": (hello_with(versions=list(range(17))), "protocol"),
    "max_data of zero": (hello_with(max_data=0), "protocol"),
    "max_data over the ceiling": (hello_with(max_data=MAX_DATA_PAYLOAD + 1), "protocol"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_malformed_out_of_order_and_oversized_input_is_rejected(
    running: Collector, case: str
) -> None:
    """Each protocol violation gets its REJECT code, one log line, and leaves nothing."""
    script, code = HOSTILE[case]
    async with await running.connect() as agent:
        with bounded_memory():
            wire = await Wire.open(agent)
            await script(wire)
            verdict = await wire.event()
            wire.close()
    assert isinstance(verdict, Reject), verdict
    assert verdict.code in code.split("|"), verdict
    await contained(running, agent, any_of=("protocol error from agent", "failed ("))


async def test_a_rejected_request_does_not_spoil_the_connection(running: Collector) -> None:
    """After a REJECT on one channel the same agent's next channel works normally."""
    async with await running.connect() as agent:
        wire = await Wire.open(agent)
        await wire.hello()
        await wire.frame(D, b"x")
        rejected(await wire.event(), "protocol")
        stored = await backup(agent, "after", sql_dump())
    assert (running.store / "db1" / "after" / stored.name).exists()


async def test_control_characters_are_escaped_in_rejects_and_logs(running: Collector) -> None:
    """Client strings never reach a REJECT reason or a log line with raw control characters."""
    async with await running.connect() as agent:
        wire = await Wire.open(agent)
        await wire.hello()
        await wire.frame(B, begin_json(engine="my\x1b[2J\nsql", format="sql\rX"))
        reject = rejected(await wire.event(), "protocol")
        wire.close()
        wire = await Wire.open(agent)
        await wire.hello()
        await wire.frame(B, begin_json("fine"))
        await wire.frame(FrameType.ABORT, {"reason": "oops\nFAKE collector: stored evil\x07"})
        assert await wire.event() is None  # an ABORT gets no answer
        wire.close()
    assert "\x1b" not in reject.reason and "\n" not in reject.reason
    assert "\\x1b" in reject.reason
    await logged(running, "db1", agent.peer, "agent aborted: oops\\nFAKE")
    text = running.log()
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    await contained(running, agent, "agent aborted")


# --- database names ---------------------------------------------------------------------------

ALLOWED_NAMES = {
    "a/b": "a%2Fb",
    "..": "%2E%2E",
    ".hidden": "%2Ehidden",
    "sp ace": "sp%20ace",
    "ünï": "%C3%BCn%C3%AF",
    "-dash": "%2Ddash",
    "100%": "100%25",
    "x" * 64: "x" * 64,
}


async def test_names_servers_allow_are_stored_under_the_safe_encoding(running: Collector) -> None:
    """`a/b`, `..`, `.hidden`, `sp ace`, `ünï` are stored, encoded, inside the agent's folder."""
    async with await running.connect() as agent:
        for name in ALLOWED_NAMES:
            await backup(agent, name, sql_dump(name.encode()))
        channel = await open_channel(agent)
        await channel.send(ListRequest())
        listing = await channel.expect(Listing, timeout=10)
        channel.close()
    assert isinstance(listing, Listing)
    assert sorted(b["database"] for b in listing.backups) == sorted(ALLOWED_NAMES)
    root = running.store.resolve()
    assert sorted(p.name for p in root.iterdir()) == ["db1"]  # nothing escaped the agent
    for name, encoded in ALLOWED_NAMES.items():
        folder = running.store / "db1" / encoded
        (data,) = folder.glob("*.sql.zst")
        assert data.name.startswith(f"{encoded}_") and data.resolve().parent == folder.resolve()
        manifest = json.loads(Path(f"{data}.manifest.json").read_text())
        assert manifest["database"] == name and manifest["agent"] == "db1"
        assert not any(p.name.startswith(".") for p in folder.iterdir())


REFUSED_NAMES = {
    "NUL": "nul\x00byte",
    "newline": "line\nfeed",
    "escape sequence": "red\x1b[31m",
    "DEL": "del\x7f",
    "65 characters": "x" * 65,
    "trailing space": "trailing ",
    "trailing ideographic space": "trailing\u3000",
    "empty": "",
    "outside the BMP": "emoji😀",
    "unassigned code point": "x\u0378",
}


@pytest.mark.parametrize("case", list(REFUSED_NAMES))
async def test_names_no_server_allows_are_refused(running: Collector, case: str) -> None:
    """NUL, control characters, >64 characters, trailing space: REJECT bad_name, no file."""
    async with await running.connect() as agent:
        with bounded_memory():
            wire = await Wire.open(agent)
            await wire.hello()
            verdict = await wire.upload(REFUSED_NAMES[case], sql_dump())
            wire.close()
    rejected(verdict, "bad_name")
    await contained(running, agent, "failed (bad_name)")
    assert "\x00" not in running.log() and "\x1b" not in running.log()


async def test_a_lone_surrogate_is_refused_as_a_name(running: Collector) -> None:
    """JSON can carry half a UTF-16 pair; it is refused, not stored or crashed on."""
    async with await running.connect() as agent:
        for request in (
            (B, json.dumps(fresh(begin_json("x"))).replace('"x"', '"\\ud800"').encode()),
            (FrameType.LIST, b'{"database": "\\udfff"}'),
            (FrameType.FETCH, b'{"database": "\\ud800", "name": "n"}'),
        ):
            wire = await Wire.open(agent)
            await wire.hello()
            await wire.frame(*request)
            rejected(await wire.event(), "bad_name")
            wire.close()
    assert "internal error" not in running.log()
    await contained(running, agent, "database name refused")


async def test_unicode_look_alikes_stay_distinct(running: Collector) -> None:
    """Latin, Cyrillic and decomposed spellings that look alike are separate backups."""
    names = ["hospital", "h\u043espital", "hospit\u0430l", "caf\u00e9", "cafe\u0301", "Hospital"]
    async with await running.connect() as agent:
        for name in names:
            await backup(agent, name, sql_dump(name.encode()))
    folders = sorted(p.name for p in (running.store / "db1").iterdir())
    assert len(folders) == len(names) == len({encode_database(n) for n in names})
    for name in names:
        (data,) = (running.store / "db1" / encode_database(name)).glob("*.sql.zst")
        assert json.loads(Path(f"{data}.manifest.json").read_text())["database"] == name


# --- start time, size, decompression bomb ----------------------------------------------------

BAD_TIMES: dict[str, Callable[[], str]] = {
    "a day ahead": lambda: now_iso(86400),
    "two hours ago": lambda: now_iso(-7200),
    "year 9999": lambda: "9999-12-31T23:59:59+00:00",
    "epoch": lambda: "1970-01-01T00:00:00+00:00",
    "no time zone": lambda: datetime.now(UTC).replace(tzinfo=None).isoformat(),
    "not UTC": lambda: datetime.now(UTC).astimezone(timezone_plus_two()).isoformat(),
    "not a time": lambda: "yesterday",
    "control characters": lambda: "2026-11-26\x1b[2J",
}


def timezone_plus_two() -> Any:
    from datetime import timezone

    return timezone(timedelta(hours=2))


@pytest.mark.parametrize("case", list(BAD_TIMES))
async def test_forged_or_far_off_start_time_is_refused(running: Collector, case: str) -> None:
    """The date in a backup's name comes from a start time near the collector's clock."""
    async with await running.connect() as agent:
        with bounded_memory():
            wire = await Wire.open(agent)
            await wire.hello()
            verdict = await wire.upload("hospital", sql_dump(), started_at=BAD_TIMES[case]())
            wire.close()
    rejected(verdict, "bad_time")
    await contained(running, agent, "failed (bad_time)")


@pytest.mark.parametrize("cap", ["storage", "agent"])
async def test_stream_over_the_maximum_size_is_cut_off(deployment: Deployment, cap: str) -> None:
    """storage.max_backup_bytes and the agent's own cap stop the stream mid-way."""
    settings: dict[str, Any] = (
        {"storage": "max_backup_bytes = 1048576"}
        if cap == "storage"
        else {"agents": {"db1": "max_backup_bytes = 1048576\n"}}
    )
    payload = bytes(zstandard.ZstdCompressor(level=1).compress(os.urandom(4 * 1024 * 1024)))
    async with collector(deployment, **settings) as c, await c.connect() as agent:
        with bounded_memory():
            wire = await Wire.open(agent)
            await wire.hello()
            verdict = await wire.upload("big", payload)
            wire.close()
        reason = rejected(verdict, "too_large").reason
        assert "1048576" in reason
        await contained(c, agent, "failed (too_large)")


def bomb(compression: str, size: int = 256 * 1024 * 1024) -> bytes:
    """A valid dump of ``size`` zero bytes that compresses by a factor of a thousand or more."""
    zeros = bytes(1024 * 1024)
    if compression == "gzip":
        gz = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = [gz.compress(zeros) for _ in range(size // len(zeros))]
        return b"".join(parts) + gz.compress(TRAILER) + gz.flush()
    zs = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [zs.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join(parts) + zs.compress(TRAILER) + zs.flush()


# A 256 MiB bomb held in memory would grow RSS by more than this; see the next test for
# the tighter bound the design promises.
BOMB_MEMORY_LIMIT_MIB = {"zstd": MEMORY_LIMIT_MIB, "gzip": MEMORY_LIMIT_MIB}


async def _explode(deployment: Deployment, compression: str, limit_mib: int) -> None:
    payload = bomb(compression)
    assert len(payload) < 1024 * 1024
    async with collector(deployment, storage="max_expansion = 100") as c:
        async with await c.connect() as agent:
            with bounded_memory(limit_mib):
                wire = await Wire.open(agent)
                await wire.hello()
                verdict = await wire.upload("bomb", payload, compression=compression)
                wire.close()
        assert "decompression bomb" in rejected(verdict, "integrity").reason
        await contained(c, agent, "failed (integrity)")


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
async def test_decompression_bomb_is_refused_at_verify(
    deployment: Deployment, compression: str
) -> None:
    """A stream that expands past max_expansion is refused before it is all decompressed."""
    await _explode(deployment, compression, BOMB_MEMORY_LIMIT_MIB[compression])


async def test_zstd_bomb_stays_within_a_few_tens_of_mib(deployment: Deployment) -> None:
    """The zstd bomb is served in the same few tens of MiB as every other hostile input."""
    await _explode(deployment, "zstd", MEMORY_LIMIT_MIB)


# --- namespaces ---------------------------------------------------------------------------------


async def _list(agent: Agent, request: bytes) -> list[dict[str, Any]]:
    wire = await Wire.open(agent)
    await wire.hello()
    await wire.frame(FrameType.LIST, request)
    listing = await wire.event()
    wire.close()
    assert isinstance(listing, Listing), listing
    return list(listing.backups)


async def _fetch(agent: Agent, database: str, name: str) -> Event | None:
    wire = await Wire.open(agent)
    await wire.hello()
    await wire.frame(FrameType.FETCH, {"database": database, "name": name})
    answer = await wire.event()
    if isinstance(answer, FetchMeta):
        chunks = []
        while isinstance(event := await wire.event(), Data):
            chunks.append(event.payload)
        assert isinstance(event, End)
        answer = Data(b"".join(chunks))
    wire.close()
    return answer


async def test_an_agent_lists_and_fetches_only_its_own_backups(running: Collector) -> None:
    """LIST and FETCH of another agent's backups find nothing, however the name is spelled."""
    secret, mine, theirs = sql_dump(b"db2 secret"), sql_dump(b"db1 shared"), sql_dump(b"db2 shared")
    async with await running.connect("db2") as other:
        hidden = await backup(other, "secret", secret)
        await backup(other, "shared", theirs)
    async with await running.connect("db1") as agent:
        own = await backup(agent, "shared", mine)
        with bounded_memory():
            everything = await _list(agent, b"{}")
            assert [(b["database"], b["sha256"]) for b in everything] == [("shared", own.sha256)]
            for database in ("secret", "../db2/secret", "../../store/db2/secret", "/"):
                assert await _list(agent, json.dumps({"database": database}).encode()) == []
            for database, name in (
                ("secret", hidden.name),
                ("../db2/secret", hidden.name),
                ("shared", f"../../db2/secret/{hidden.name}"),
                ("shared", f"{hidden.name}.manifest.json"),
            ):
                rejected(await _fetch(agent, database, name), "not_found")
            fetched = await _fetch(agent, "shared", own.name)  # same file name as db2's
    assert fetched == Data(mine)
    await logged(running, "db1", agent.peer, "no backup")
    assert files_of(running.store, "db1") == sorted(
        Path("shared") / n for n in (own.name, own.name + ".manifest.json")
    )
    await still_serves_others(running)


async def test_no_field_names_another_agent(running: Collector) -> None:
    """The namespace is the login name: no event has an agent field and extra fields are ignored."""
    for event in (Hello, Begin, End, ListRequest, Fetch):
        names = {f.name for f in dataclasses.fields(event)}
        assert not names & {"agent", "namespace", "owner", "path", "root", "folder", "user"}
    smuggled = {"agent": "db2", "namespace": "db2", "owner": "db2", "path": "/etc", "root": "/"}
    payload = sql_dump(b"mine")
    async with await running.connect() as agent:
        wire = await Wire.open(agent)
        await wire.hello(**smuggled)
        stored = await wire.upload("smuggled", payload, **smuggled)
        wire.close()
        assert isinstance(stored, Stored)
        assert [b["database"] for b in await _list(agent, json.dumps(smuggled).encode())] == [
            "smuggled"
        ]
    assert not (running.store / "db2").exists()
    manifest = json.loads(
        (running.store / "db1" / "smuggled" / f"{stored.name}.manifest.json").read_text()
    )
    assert manifest["agent"] == "db1"
    with pytest.raises(asyncssh.PermissionDenied):  # db1's key under db2's name
        await running.connect("db2", key=str(running.deployment.agents["db1"]))
    await logged(running, "refused login as agent db2 from 127.0.0.1:")
    await still_serves_others(running)


async def test_agent_allow_list_refuses_other_databases(deployment: Deployment) -> None:
    """With `databases` set for an agent, any other name is REJECT not_allowed."""
    async with collector(deployment, agents={"db1": 'databases = ["hospital"]\n'}) as c:
        async with await c.connect() as agent:
            await backup(agent, "hospital", sql_dump())
            wire = await Wire.open(agent)
            await wire.hello()
            rejected(await wire.upload("payroll", sql_dump()), "not_allowed")
            wire.close()
        await logged(c, "db1", agent.peer, "failed (not_allowed)")
        assert [p.parts[0] for p in files_of(c.store, "db1")] == ["hospital", "hospital"]
        await still_serves_others(c)


# --- idempotent retry, no overwrite, read-only files ------------------------------------------


async def test_identical_retry_is_idempotent(running: Collector) -> None:
    """The same bytes again the same day: the same name comes back and one file is kept."""
    payload = sql_dump(b"same")
    async with await running.connect() as agent:
        first = await backup(agent, "hospital", payload)
        second = await backup(agent, "hospital", payload)
    assert first == second
    assert files_of(running.store, "db1") == [
        Path("hospital") / first.name,
        Path("hospital") / f"{first.name}.manifest.json",
    ]


async def test_different_content_the_same_day_never_overwrites(running: Collector) -> None:
    """A second, different backup the same day is `-2`; the first is untouched and 0440."""
    async with await running.connect() as agent:
        first = await backup(agent, "hospital", sql_dump(b"one"))
        path = running.store / "db1" / "hospital" / first.name
        before = path.read_bytes()
        second = await backup(agent, "hospital", sql_dump(b"two"))
    assert second.name == first.name.replace(".sql.zst", "-2.sql.zst")
    assert path.read_bytes() == before
    for file in (running.store / "db1" / "hospital").iterdir():
        assert file.stat().st_mode & 0o777 == 0o440, file
        with pytest.raises(PermissionError) if os.geteuid() != 0 else contextlib.nullcontext():
            file.open("ab").close()


async def test_uploads_side_by_side_are_each_verified_and_counted_back(
    running: Collector,
) -> None:
    """One upload alone, then two at once (worker threads), then a corrupt one: every
    upload is verified, and the count of uploads in progress returns to zero each time."""
    payloads = {name: sql_dump(os.urandom(200_000).hex().encode()) for name in ("a", "b")}
    async with await running.connect() as agent:
        channels = {name: await open_channel(agent) for name in payloads}
        for count, (name, payload) in enumerate(payloads.items(), start=1):
            await channels[name].send(Begin(**fresh(begin_json(name))))
            await channels[name].send(Data(payload[:1000]))
            await _until(lambda count=count: running.ctx.uploads == count)  # type: ignore[misc]
        for name, payload in payloads.items():
            await channels[name].send(Data(payload[1000:]))
            await channels[name].send(End(len(payload), sha256(payload), {}))
        for name in payloads:
            assert isinstance(await channels[name].expect(Stored, timeout=30), Stored)
            channels[name].close()
        await _until(lambda: running.ctx.uploads == 0)
        corrupt = await open_channel(agent)
        await corrupt.send(Begin(**fresh(begin_json("c"))))
        await corrupt.send(Data(payloads["a"]))
        await corrupt.send(End(len(payloads["a"]), sha256(b"something else"), {}))
        with pytest.raises(RejectedError, match="SHA-256 mismatch"):
            await corrupt.expect(Stored, timeout=30)
        corrupt.close()
        await _until(lambda: running.ctx.uploads == 0)
    for name, payload in payloads.items():
        (stored,) = (running.store / "db1" / name).glob("*.sql.zst")
        assert stored.read_bytes() == payload
    assert {path.parts[0] for path in files_of(running.store, "db1")} == {"a", "b"}


# --- SSH requests other than the subsystem ---------------------------------------------------


async def test_refused_ssh_requests_are_logged_with_the_peer(running: Collector) -> None:
    """PTY, shell, exec, SFTP, forwarding of any kind and env: refused, each logged."""
    async with await running.connect() as agent:
        conn = agent.conn
        with bounded_memory():
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("cat /etc/passwd", check=False)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process()
            with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
                await conn.create_process(term_type="xterm", subsystem="backhaul")
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.start_sftp_client()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", running.port)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection("/run/mysqld/mysqld.sock")
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelOpenError, match="X11"):
                await conn.create_process(
                    subsystem="backhaul", x11_forwarding=True, x11_display="127.0.0.1:0"
                )
            chan, _ = await conn.create_session(
                asyncssh.SSHClientSession, subsystem="backhaul", encoding=None
            )
            # No public client API asks for these with a reply; the refusal is the point.
            assert await chan._make_request(b"auth-agent-req@openssh.com") is False
            assert await chan._make_request(b"env", String("LC_CANARY"), String("1")) is False
            chan.close()
    for words in (
        ("refused exec request", "cat /etc/passwd"),
        ("refused shell request",),
        ("refused PTY request",),
        ("refused subsystem 'sftp'",),
        ("refused port forwarding to", f"127.0.0.1:{running.port}"),
        ("refused socket forwarding to", "/run/mysqld/mysqld.sock"),
        ("refused remote port forwarding from",),
        ("refused X11 forwarding request",),
        ("refused agent forwarding request",),
        ("refused env request LC_CANARY",),
    ):
        await logged(running, "db1", agent.peer, *words)
    assert files_of(running.store, "db1") == []
    await still_serves_others(running)


async def test_environment_variables_have_no_effect(running: Collector) -> None:
    """env sent along with the subsystem is refused; the backup lands where it always does."""
    env = {
        "BACKHAUL_STORE": "/tmp",
        "HOME": "/",
        "LD_PRELOAD": "/tmp/evil.so",
        "TZ": "Pacific/Kiritimati",
    }
    async with await running.connect() as agent:
        writer, reader, _ = await agent.conn.open_session(
            subsystem=SUBSYSTEM, encoding=None, env=env
        )
        channel = Channel(writer, reader)
        await channel.handshake()
        payload = sql_dump(b"env")
        await channel.send(Begin(**fresh(begin_json("envtest"))))
        await channel.send(Data(payload))
        await channel.send(End(len(payload), sha256(payload), {}))
        stored = await channel.expect(Stored, timeout=30)
        channel.close()
    assert isinstance(stored, Stored)
    assert stored.name == f"envtest_{datetime.now(UTC):%Y%m%d}.sql.zst"
    assert (running.store / "db1" / "envtest" / stored.name).read_bytes() == payload
    line = await logged(running, "db1", agent.peer, "refused env request")
    assert any(f"request {name} from" in line for name in env)


# --- keys and certificates against the real collector ----------------------------------------


@dataclasses.dataclass
class Pki:
    authority: ca.CertificateAuthority
    other: ca.CertificateAuthority
    keys: Path
    revoked: Path

    def cert(self, name: str, principal: str, **kw: Any) -> tuple[str, str]:
        files = ca.generate_key_pair(self.keys, name, comment=name)
        authority = kw.pop("authority", self.authority)
        issued = authority.issue_agent(principal, files.public, **kw)
        return str(files.private), str(issued.path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    (tmp_path / "pki").mkdir()
    revoked = tmp_path / "pki" / "revoked.txt"
    revoked.write_text("# nothing revoked yet\n")
    return Pki(
        ca.CertificateAuthority.create(tmp_path / "pki" / "ca"),
        ca.CertificateAuthority.create(tmp_path / "pki" / "other-ca"),
        tmp_path / "pki",
        revoked,
    )


def _pki_server(pki: Pki) -> str:
    return (
        f'login_timeout = 5\nca_public_key = "{pki.authority.public_key_path}"\n'
        f'revocation_list = "{pki.revoked}"'
    )


Credential = Callable[[Pki, Deployment], tuple[str, Any, str]]  # user, key, log words

CREDENTIALS: dict[str, Credential] = {
    "unknown key": lambda p, d: (
        "db1",
        str(ca.generate_key_pair(p.keys, "stranger", comment="x").private),
        "is not listed for it",
    ),
    "unknown agent name": lambda p, d: ("nobody", str(d.agents["db1"]), "is not listed for it"),
    "another agent's key": lambda p, d: ("db2", str(d.agents["db1"]), "is not listed for it"),
    "revoked listed key": lambda p, d: ("db1", _revoked_key(p, d.agents["db1"]), "is revoked"),
    "expired certificate": lambda p, d: (
        "web",
        p.cert("web", "web", validity="+1w", now=time.time() - 30 * 86400),
        "outside its validity",
    ),
    "certificate not yet valid": lambda p, d: (
        "web",
        p.cert("web", "web", now=time.time() + 86400),
        "outside its validity",
    ),
    "certificate for another principal": lambda p, d: (
        "db2",
        p.cert("web", "web"),
        "do not name it",
    ),
    "certificate from another CA": lambda p, d: (
        "web",
        p.cert("web", "web", authority=p.other),
        "not by the Backhaul CA",
    ),
    "revoked certificate": lambda p, d: (
        "web",
        _revoke_cert(p, p.cert("web", "web")),
        "is revoked",
    ),
    "host certificate": lambda p, d: ("web", _host_cert(p), "not a user certificate"),
}


def _revoked_key(pki: Pki, private: Path) -> str:
    _revoke(pki, RevocationEntry("key", key_fp(asyncssh.read_public_key(f"{private}.pub"))))
    return str(private)


def _revoke(pki: Pki, entry: RevocationEntry) -> None:
    ca.append_revocations(pki.revoked, [entry])


def _revoke_cert(pki: Pki, cert: tuple[str, str]) -> tuple[str, str]:
    serial = ca.read_certificate(Path(cert[1])).serial
    _revoke(pki, RevocationEntry("serial", str(serial)))
    return cert


def _host_cert(pki: Pki) -> tuple[str, str]:
    files = ca.generate_key_pair(pki.keys, "web", comment="web")
    issued = pki.authority.issue_host(["web"], files.public)
    return str(files.private), str(issued.path)


@pytest.mark.parametrize("case", list(CREDENTIALS))
async def test_bad_keys_and_certificates_are_refused_by_the_collector(
    deployment: Deployment, pki: Pki, case: str
) -> None:
    """Unknown, expired, revoked or wrong-principal: no login, a log line, nothing stored."""
    user, key, words = CREDENTIALS[case](pki, deployment)
    web = '\n[[agents]]\nname = "web"\n'
    async with collector(deployment, server=_pki_server(pki), extra=web) as c:
        with bounded_memory(), pytest.raises(asyncssh.PermissionDenied):
            await c.connect(user, key=key)
        line = await logged(c, "refused login as agent", user, "from 127.0.0.1:", words)
        assert "authenticated" not in c.log()
        assert stored_files(c.store) == []
        await still_serves_others(c)
        good = pki.cert("web-good", "web")
        async with await c.connect("web", key=good) as agent:
            await backup(agent, "by_certificate", sql_dump())
    assert user in line


async def test_revocation_reaches_an_open_connection(deployment: Deployment, pki: Pki) -> None:
    """A certificate revoked after login can open no further channel."""
    web = '\n[[agents]]\nname = "web"\n'
    cert = pki.cert("web", "web")
    async with collector(deployment, server=_pki_server(pki), extra=web) as c:
        async with await c.connect("web", key=cert) as agent:
            await backup(agent, "before", sql_dump())
            _revoke_cert(pki, cert)
            with pytest.raises(asyncssh.ChannelOpenError):
                await open_channel(agent)
        await logged(c, "refused a channel to agent web", agent.peer, "revoked")
        assert [p.parts[0] for p in files_of(c.store, "web")] == ["before", "before"]
        await still_serves_others(c)


async def test_agent_refuses_a_collector_whose_host_key_changed(
    running: Collector, tmp_path: Path
) -> None:
    """The real agent client, pinned to another key, refuses before it authenticates."""
    impostor = tmp_path / "impostor"
    ca.generate_key_pair(tmp_path, "impostor", comment="impostor")
    password = tmp_path / "pw"
    password.write_text("unused\n")
    config = running.deployment.agent_toml(
        "db1",
        running.port,
        f"""
        [[sources]]
        name = "main"
        engine = "mysql"
        user = "backup"
        password_file = "{password}"
        databases = ["hospital"]
        """,
        host_key=impostor.with_suffix(".pub"),
    )
    client = CollectorClient(load_agent_config(config))
    with pytest.raises(TransportError, match="does not match the pinned"):
        await client.connect()
    await client.close()
    assert "agent db1 authenticated" not in running.log()
    assert stored_files(running.store) == []
    await still_serves_others(running)


# --- silence, trickles and caps --------------------------------------------------------------


async def test_connection_without_a_channel_is_closed_after_the_idle_timeout(
    deployment: Deployment,
) -> None:
    """Authenticated and then silent: the collector hangs up after idle_timeout."""
    async with collector(deployment, server="idle_timeout = 2") as c:
        async with await c.connect() as agent:
            start = time.monotonic()
            await asyncio.wait_for(agent.conn.wait_closed(), 15)
            assert 1.5 < time.monotonic() - start < 10
        await contained(c, agent, "no channel open for 2 s")


async def test_silent_channel_is_rejected_at_the_handshake_deadline(deployment: Deployment) -> None:
    """A channel that never sends its HELLO is answered REJECT protocol and closed."""
    async with collector(deployment, handshake_timeout=2.0) as c:
        async with await c.connect() as agent:
            wire = await Wire.open(agent)
            start = time.monotonic()
            rejected(await wire.event(timeout=15), "protocol")
            assert 1.5 < time.monotonic() - start < 10
            wire.close()
        await contained(c, agent, "no complete HELLO and request within 2 s")


async def test_channel_without_a_subsystem_is_closed(deployment: Deployment) -> None:
    """A session channel that asks for nothing is closed at the handshake deadline."""
    async with collector(deployment, handshake_timeout=2.0) as c:
        async with await c.connect() as agent:
            conn = agent.conn
            # No public client API opens a session channel without a request.
            chan: Any = asyncssh.SSHClientChannel(
                conn, asyncio.get_running_loop(), "strict", None, "strict", 65536, 32768
            )
            await chan._open(b"session")
            await asyncio.wait_for(chan.wait_closed(), 15)
        await contained(c, agent, "no subsystem requested in 2 s")


async def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the collector did not catch up")


async def _trickle(wire: Wire, data: bytes, interval: float) -> None:
    for byte in data:
        if not await wire.write(bytes([byte])):
            return
        await asyncio.sleep(interval)


@pytest.mark.parametrize("phase", ["HELLO", "request"])
async def test_trickled_handshake_is_cut_off(deployment: Deployment, phase: str) -> None:
    """One byte every 0.2 s keeps the idle timer alive but not the handshake deadline."""
    hello = encode_frame(H, json.dumps(HELLO_JSON).encode())
    request = encode_frame(B, json.dumps(fresh(begin_json())).encode())
    async with collector(deployment, handshake_timeout=2.0) as c:
        async with await c.connect() as agent:
            wire = await Wire.open(agent)
            with bounded_memory():
                if phase == "request":
                    await wire.write(hello)
                    assert isinstance(await wire.event(), Hello)
                trickle = asyncio.create_task(
                    _trickle(wire, hello + request if phase == "HELLO" else request, 0.2)
                )
                start = time.monotonic()
                verdict = await wire.event(timeout=15)
                elapsed = time.monotonic() - start
                trickle.cancel()
            wire.close()
        rejected(verdict, "protocol")
        assert elapsed < 8
        await contained(c, agent, "no complete HELLO and request within 2 s")


async def test_trickled_upload_is_cut_off(deployment: Deployment) -> None:
    """An upload under min_upload_rate for a window is REJECTed and its temporary removed."""
    tuned = collector(deployment, min_upload_rate=1024, min_upload_rate_window=2.0)
    async with tuned as c, await c.connect() as agent:
        wire = await Wire.open(agent)
        await wire.hello()
        await wire.frame(B, begin_json("slow"))
        with bounded_memory():
            trickle = asyncio.create_task(_trickle(wire, encode_frame(D, os.urandom(4096)), 0.1))
            start = time.monotonic()
            verdict = await wire.event(timeout=20)
            elapsed = time.monotonic() - start
            trickle.cancel()
        wire.close()
        assert "upload too slow" in rejected(verdict, "protocol").reason
        assert 1.5 < elapsed < 10
        await contained(c, agent, "failed (protocol)", "upload too slow")


async def test_a_fast_upload_is_not_mistaken_for_a_trickle(deployment: Deployment) -> None:
    """The rate floor leaves a normal upload alone, even a long one."""
    payload = sql_dump(os.urandom(1024 * 1024).hex().encode(), "zstd")
    tuned = collector(deployment, min_upload_rate=1024, min_upload_rate_window=0.5)
    async with tuned as c, await c.connect() as agent:
        channel = await open_channel(agent)
        await channel.send(Begin(**fresh(begin_json("steady"))))
        for start in range(0, len(payload), 64 * 1024):
            await channel.send(Data(payload[start : start + 64 * 1024]))
            await asyncio.sleep(0.02)
        await channel.send(End(len(payload), sha256(payload), {}))
        assert isinstance(await channel.expect(Stored, timeout=30), Stored)
        channel.close()


async def test_too_many_connections_from_one_agent_are_answered_busy(
    deployment: Deployment,
) -> None:
    """Over max_connections_per_agent: REJECT busy, then the extra connection is dropped."""
    server = "login_timeout = 5\nidle_timeout = 30\nmax_connections_per_agent = 2"
    async with collector(deployment, server=server, handshake_timeout=3.0) as c:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(await c.connect())
            extra = await stack.enter_async_context(await c.connect())
            with bounded_memory():
                wire = await Wire.open(extra)
                await wire.hello()
                assert "too many connections" in rejected(await wire.event(), "busy").reason
                await asyncio.wait_for(extra.conn.wait_closed(), 15)
            await logged(c, "agent db1", extra.peer, "(cap 2): answering busy")
            await logged(c, "db1", extra.peer, "over its connection cap")
            await still_serves_others(c)
        await _until(lambda: not c.server.caps.per_agent.get("db1"))
        async with await c.connect() as again:  # slots are given back
            await backup(again, "later", sql_dump())


async def test_too_many_connections_overall_are_dropped(deployment: Deployment) -> None:
    """Over max_connections the newcomer is disconnected; a freed slot serves again."""
    server = "login_timeout = 5\nidle_timeout = 30\nmax_connections = 3"
    async with collector(deployment, server=server) as c, contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(await c.connect()) for _ in range(3)]
        with bounded_memory(), pytest.raises((asyncssh.Error, OSError)):
            await c.connect("db2")
        await logged(c, "refusing connection from 127.0.0.1:", "3 connections open (cap 3)")
        await held[0].__aexit__()
        await _until(lambda: c.server.caps.total < 3)
        await still_serves_others(c)


async def _handshake_never_finished(
    port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from ``source`` that reads the server's banner and sends nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-")
    return reader, writer


async def test_one_address_cannot_hold_more_than_its_share_of_handshakes(
    deployment: Deployment,
) -> None:
    """Over max_unauthenticated_per_address the newcomer from that address is dropped at
    once; agents from elsewhere still get in, and a finished handshake frees its slot."""
    server = "login_timeout = 60\nidle_timeout = 30\nmax_unauthenticated_per_address = 2"
    async with collector(deployment, server=server) as c:
        stalling = [await _handshake_never_finished(c.port, "127.0.0.2") for _ in range(2)]
        extra, _ = await asyncio.open_connection("127.0.0.1", c.port,
                                                 local_addr=("127.0.0.2", 0))
        ending = await asyncio.wait_for(extra.read(), 5)  # to EOF: the third is dropped
        assert b"Disconnected" in ending
        await logged(c, "refusing connection from 127.0.0.2:",
                     "2 connections from that address not authenticated yet (cap 2)")
        assert c.server.caps.unauthenticated["127.0.0.2"] == 2
        await still_serves_others(c)  # from 127.0.0.1, authenticated: not counted
        assert "127.0.0.1" not in c.server.caps.unauthenticated
        stalling[0][1].close()
        await _until(lambda: c.server.caps.unauthenticated.get("127.0.0.2", 0) < 2)
        kept, _ = await _handshake_never_finished(c.port, "127.0.0.2")
        with pytest.raises(TimeoutError):  # a slot was free again: not dropped
            await asyncio.wait_for(kept.read(), 1)
        for _, writer in stalling:
            writer.close()


def test_the_handshake_cap_is_off_by_default_and_refuses_a_negative(
    deployment: Deployment,
) -> None:
    default = load_collector_config(deployment.collector_toml())
    assert default.server.max_unauthenticated_per_address == 0
    negative = deployment.collector_toml(server_extra="max_unauthenticated_per_address = -1")
    with pytest.raises(ConfigError, match="max_unauthenticated_per_address must be between"):
        load_collector_config(negative)


async def test_too_many_channels_on_one_connection_are_answered_busy(
    deployment: Deployment,
) -> None:
    """Over max_channels_per_connection: REJECT busy; at twice the cap, no channel at all."""
    server = "login_timeout = 5\nidle_timeout = 30\nmax_channels_per_connection = 2"
    async with collector(deployment, server=server, handshake_timeout=5.0) as c:
        async with await c.connect() as agent:
            with bounded_memory():
                held = [await Wire.open(agent) for _ in range(2)]
                for wire in held:
                    await wire.hello()
                busy = await Wire.open(agent)
                await busy.hello()
                assert "too many channels" in rejected(await busy.event(), "busy").reason
                quiet = [await Wire.open(agent) for _ in range(2)]  # open, no HELLO yet
                with pytest.raises(asyncssh.ChannelOpenError):
                    await Wire.open(agent)
            for wire in held + quiet:
                wire.close()
        await logged(c, "agent db1", agent.peer, "channels open on one connection (cap 2)")
        await contained(c, agent, "refused a channel to agent db1", "(cap 2)")
