"""Alerting end to end: real backups fail and succeed, and the administrator hears of it.

A real Prometheus scrapes a real collector and evaluates the shipped rules; a real
webhook receiver (aiohttp) and SMTP server (aiosmtpd) get the collector's notifications;
the real ``backhaul-agent`` command backs up a real MariaDB, stalls on a locked table,
and retries a collector that is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from agent.config import CollectorEndpoint
from agent.link.retry import RetryPolicy
from common.naming import MANIFEST_SUFFIX
from tests.integration.harness import (
    Deployment,
    final_files,
    log_text,
    mysql_source,
    run_agent,
    running_collector,
    stored_files,
)
from tests.integration.loopback import free_port
from tests.integration.mariadb_server import MariaDBServer
from tests.integration.metrics_scrape import sample, scrape

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "backhaul-rules.yml"
JOB = "backhaul-collector"  # the job name BackhaulCollectorDown matches on
WARD, STALLED = "ward", "stalled"
CANARY = "Wr0ng-canary-Passw0rd"

# agent.toml's [collector] retries/retry_backoff: short waits when the loader knows them,
# otherwise the agent runs with the defaults and the retry tests take that long.
_ENDPOINT_FIELDS = {f.name for f in dataclasses.fields(CollectorEndpoint)}
RETRY_CONFIGURABLE = {"retries", "retry_backoff"} <= _ENDPOINT_FIELDS
RETRY = RetryPolicy(retries=2, backoff=0.5) if RETRY_CONFIGURABLE else RetryPolicy()


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """A Prometheus binary; its absence fails the test, it never skips it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install Debian's 'prometheus' package")
    return path


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30, every: float = 0.2
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def password_file(folder: Path, password: str) -> Path:
    path = folder / "mysql.pass"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def collector_toml(deployment: Deployment, extra: str = "") -> Path:
    return deployment.collector_toml(
        extra=extra, agent_extra={"db1": f'databases = ["{WARD}", "{STALLED}"]\n'}
    )


def metrics_table(port: int) -> str:
    return f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'


def agent_toml(deployment: Deployment, collector_port: int, source: str) -> Path:
    path = deployment.agent_toml("db1", collector_port, source)
    if RETRY_CONFIGURABLE:
        text = path.read_text().replace(
            "connect_timeout = 10\n",
            f"connect_timeout = 10\nretries = {RETRY.retries}\nretry_backoff = {RETRY.backoff}\n",
        )
        path.write_text(text)
    return path


async def promtool_check_metrics(body: str) -> None:
    check = await asyncio.create_subprocess_exec(
        tool("promtool"), "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(check.communicate(body.encode()), timeout=60)
    assert check.returncode == 0, output.decode()
    assert output.strip() == b"", output.decode()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def databases(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    """``ward``, a small database, and ``stalled``, whose sequence a test locks.

    The agent's preflight reads every table (which a locked table would block), but not
    a sequence's row; the dump tool does. Locking the sequence therefore makes the dump
    itself hang with no output, as a database blocked by another session does.
    """
    for name in (WARD, STALLED):
        mariadb.create_database(name)
    mariadb.execute(
        "CREATE TABLE patients (id INT PRIMARY KEY, name VARCHAR(80)) ENGINE=InnoDB", WARD
    )
    mariadb.execute("INSERT INTO patients VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Edsger')", WARD)
    mariadb.execute("CREATE TABLE tickets (id INT PRIMARY KEY) ENGINE=InnoDB", STALLED)
    mariadb.execute("CREATE SEQUENCE ticket_seq", STALLED)
    yield mariadb
    for name in (WARD, STALLED):
        mariadb.execute(f"DROP DATABASE IF EXISTS `{name}`")


def ward_source(server: MariaDBServer, folder: Path, password: str) -> str:
    pw = password_file(folder, password)
    return mysql_source(server.port, f'["{WARD}"]', password_file=pw)


# --------------------------------------------------------------------------- Prometheus


def rules_without_for(source: Path, target: Path) -> Path:
    """A copy of ``source`` with every ``for:`` duration set to 0s, and nothing else changed.

    The shipped rules hold some alerts for minutes before they fire; a test that waits
    that long is useless, so the copy fires at the first true evaluation.
    """
    pattern = re.compile(r"^(?P<indent>\s+)for:\s*\S+\s*$")
    lines = source.read_text().splitlines(keepends=True)
    copied = [f"{m['indent']}for: 0s\n" if (m := pattern.match(line)) else line for line in lines]
    changed = [a for a, b in zip(lines, copied, strict=True) if a != b]
    assert changed, f"no 'for:' in {source}; the copy is pointless"
    assert all(line.strip().startswith("for:") for line in changed)
    target.write_text("".join(copied))
    return target


class Prometheus:
    """A real ``prometheus`` server scraping one collector with the shipped rules (their
    ``for:`` holds set to 0s)."""

    def __init__(self, folder: Path, target_port: int) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        rules = rules_without_for(RULES, folder / "backhaul-rules.fast.yml")
        self.config = folder / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            "    static_configs:\n"
            f'      - targets: ["127.0.0.1:{target_port}"]\n'
        )
        self.log = folder / "prometheus.log"
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            await eventually(self._ready, "prometheus to be ready")
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.terminate()
        try:
            await asyncio.wait_for(self._proc.wait(), 20)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()

    async def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.returncode is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{self.url}/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def api(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/api/v1/{path}") as r:
            body = await r.json()
        assert body["status"] == "success", body
        return body["data"]

    async def target_health(self) -> str | None:
        targets = (await self.api("targets"))["activeTargets"]
        return targets[0]["health"] if targets else None

    async def alerts(self, name: str, **labels: str) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts called ``name`` whose labels include ``labels``."""
        return [
            alert
            for alert in (await self.api("alerts"))["alerts"]
            if alert["labels"].get("alertname") == name
            and labels.items() <= alert["labels"].items()
        ]

    async def firing(self, name: str, **labels: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            found = [a for a in await self.alerts(name, **labels) if a["state"] == "firing"]
            return found[0] if found else None

        alert: dict[str, Any] = await eventually(check, f"{name}{labels} to fire")
        return alert

    async def quiet(self, name: str, **labels: str) -> None:
        async def check() -> bool:
            return not await self.alerts(name, **labels)

        await eventually(check, f"{name}{labels} to resolve")


def test_fast_rules_copy_changes_only_for_durations(tmp_path: Path) -> None:
    """The derived rule file is the shipped one with 0s holds, and promtool accepts it."""
    fast = rules_without_for(RULES, tmp_path / "fast.yml")
    shipped, derived = RULES.read_text().splitlines(), fast.read_text().splitlines()
    assert len(shipped) == len(derived)
    holds = [b for a, b in zip(shipped, derived, strict=True) if a != b]
    assert holds and all(line.strip() == "for: 0s" for line in holds)
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(fast)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"job_name: {JOB}" in (DEPLOY / "prometheus.example.yml").read_text()


async def test_failed_backup_fires_in_prometheus_and_clears_after_a_success(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """Wrong password → REPORT → BackhaulBackupFailed firing; success resolves it;
    a stopped collector fires BackhaulCollectorDown."""
    metrics_port = free_port()
    config = collector_toml(deployment, metrics_table(metrics_port))
    async with Prometheus(tmp_path, metrics_port) as prometheus:
        async with running_collector(config) as (_, port):

            async def scraped_up() -> bool:
                return await prometheus.target_health() == "up"

            await eventually(scraped_up, "prometheus to scrape the collector")
            failing = agent_toml(deployment, port, ward_source(databases, tmp_path, CANARY))
            run = await run_agent(failing)
            assert run.returncode == 5, run.stderr

            alert = await prometheus.firing("BackhaulBackupFailed", agent="db1", database=WARD)
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["job"] == JOB
            assert alert["annotations"]["summary"] == f"Backup of {WARD} on db1 failed"
            await prometheus.quiet("BackhaulCollectorDown")

            good = ward_source(databases, tmp_path, databases.root_password)
            run = await run_agent(agent_toml(deployment, port, good))
            assert run.returncode == 0, run.stderr
            await prometheus.quiet("BackhaulBackupFailed", agent="db1", database=WARD)
        down = await prometheus.firing("BackhaulCollectorDown")
    assert down["labels"]["instance"] == f"127.0.0.1:{metrics_port}"


async def test_metrics_after_real_backups_pass_promtool(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """After a failed and a stored backup the scrape has their series and lints clean."""
    metrics_port = free_port()
    config = collector_toml(deployment, metrics_table(metrics_port))
    async with running_collector(config) as (_, port):
        failing = agent_toml(deployment, port, ward_source(databases, tmp_path, CANARY))
        assert (await run_agent(failing)).returncode == 5
        after_failure = await scrape(metrics_port)
        good = ward_source(databases, tmp_path, databases.root_password)
        run = await run_agent(agent_toml(deployment, port, good))
        assert run.returncode == 0, run.stderr
        after_success = await scrape(metrics_port)
    pair = {"agent": "db1", "database": WARD}
    assert sample(after_failure, "backhaul_backup_last_attempt_success", **pair) == 0
    assert sample(after_success, "backhaul_backup_last_attempt_success", **pair) == 1
    for body in (after_failure, after_success):
        failed = sample(body, "backhaul_backups_total", result="failure", reason="dump", **pair)
        assert failed == 1
        assert (sample(body, "backhaul_agent_last_seen_timestamp_seconds", agent="db1") or 0) > 0
        await promtool_check_metrics(body)
    assert sample(after_success, "backhaul_backups_total", result="success", **pair) == 1
    (backup,) = [p for p in final_files(deployment.store) if p.name.endswith(".sql.zst")]
    size = sample(after_success, "backhaul_backup_last_size_bytes", form="compressed", **pair)
    assert size == (deployment.store / backup).stat().st_size
    manifest_path = (deployment.store / backup).with_name(backup.name + MANIFEST_SUFFIX)
    manifest = json.loads(manifest_path.read_text())
    uncompressed = sample(after_success, "backhaul_backup_last_size_bytes", form="uncompressed",
                          **pair)
    assert uncompressed == manifest["verification"]["uncompressed_bytes"] > size
    last_success = sample(after_success, "backhaul_backup_last_success_timestamp_seconds", **pair)
    assert last_success is not None and abs(last_success - time.time()) < 120
    assert CANARY not in after_failure


# --------------------------------------------------------------------------- notifications


class Hook:
    """A real webhook receiver: each POSTed JSON body lands in a queue."""

    def __init__(self) -> None:
        self.bodies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.put_nowait(await request.json())
        return web.Response(status=204)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.bodies.get(), 30)


class Mailbox:
    """aiosmtpd handler: each delivered message lands in a queue."""

    def __init__(self) -> None:
        self.mails: asyncio.Queue[tuple[list[str], EmailMessage]] = asyncio.Queue()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.content
        assert isinstance(raw, bytes)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.put_nowait((list(envelope.rcpt_tos), message))
        return "250 OK"

    async def next(self) -> tuple[list[str], EmailMessage]:
        return await asyncio.wait_for(self.mails.get(), 30)


@contextlib.asynccontextmanager
async def receivers() -> AsyncIterator[tuple[Hook, Mailbox, int]]:
    """A webhook receiver and an SMTP server on loopback; yields them and the SMTP port."""
    hook, mailbox = Hook(), Mailbox()
    app = web.Application()
    app.router.add_post("/hooks/backhaul-secret-token", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/backhaul-secret-token"
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(
        lambda: SMTP(mailbox, hostname="localhost", loop=loop), "127.0.0.1", 0
    )
    try:
        yield hook, mailbox, smtp.sockets[0].getsockname()[1]
    finally:
        smtp.close()
        await runner.cleanup()


def notify_tables(webhook: str, smtp_port: int) -> str:
    return (
        "\n[notify]\n"
        f'webhooks = ["{webhook}"]\n'
        "retries = 1\n"
        "backoff = 0.1\n"
        "timeout = 10\n"
        "\n[notify.email]\n"
        'host = "127.0.0.1"\n'
        f"port = {smtp_port}\n"
        'sender = "backhaul@backup-vm.example"\n'
        'recipients = ["admin@example.org"]\n'
        "starttls = false\n"
    )


async def test_real_failure_is_notified_by_webhook_and_email_then_recovery(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """A failed backup reaches both channels with agent, database and reason; the next
    stored backup sends a recovery naming the stored file."""
    async with receivers() as (hook, mailbox, smtp_port):
        config = collector_toml(deployment, notify_tables(hook.url, smtp_port))
        async with running_collector(config) as (_, port):
            failing = agent_toml(deployment, port, ward_source(databases, tmp_path, CANARY))
            assert (await run_agent(failing)).returncode == 5
            failure = await hook.next()
            failure_rcpt, failure_mail = await mailbox.next()
            good = ward_source(databases, tmp_path, databases.root_password)
            run = await run_agent(agent_toml(deployment, port, good))
            assert run.returncode == 0, run.stderr
            recovery = await hook.next()
            _, recovery_mail = await mailbox.next()

    assert failure["kind"] == "failure"
    assert (failure["agent"], failure["database"], failure["reason"]) == ("db1", WARD, "dump")
    assert "refused user 'root'" in failure["message"]
    assert "Access denied" in failure["message"]
    assert failure["backup"] is None and failure["suppressed"] == 0
    assert failure["collector"] == socket.gethostname()
    sent = datetime.fromisoformat(failure["time"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 120
    assert CANARY not in json.dumps(failure)

    assert failure_rcpt == ["admin@example.org"]
    assert failure_mail["Subject"] == f"[backhaul] FAILED {WARD} on db1: dump"
    body = failure_mail.get_content()
    for line in ("Agent:       db1", f"Database:    {WARD}", "Reason:      dump"):
        assert line in body
    assert "Access denied" in body and CANARY not in body

    (stored,) = [p for p in final_files(deployment.store) if p.name.endswith(".sql.zst")]
    assert recovery["kind"] == "recovery"
    assert (recovery["agent"], recovery["database"]) == ("db1", WARD)
    assert recovery["backup"] == stored.name
    assert recovery_mail["Subject"] == f"[backhaul] RECOVERED {WARD} on db1"
    assert stored.name in recovery_mail.get_content()


# --------------------------------------------------------------------------- stalls


async def test_stalled_dump_is_aborted_counted_and_visible_while_running(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """A dump blocked by another session's LOCK TABLES shows as running with a growing
    age, is aborted after stall_timeout, counted as a failure, and leaves no file."""
    metrics_port = free_port()
    config = collector_toml(deployment, metrics_table(metrics_port))
    pair = {"agent": "db1", "database": STALLED}
    pw = password_file(tmp_path, databases.root_password)
    source = mysql_source(
        databases.port, f'["{STALLED}"]', password_file=pw, extra="stall_timeout = 2\n"
    )
    locker = databases.connect(STALLED)
    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLES ticket_seq WRITE")
        async with running_collector(config) as (_, port):
            started = time.monotonic()
            agent = asyncio.create_task(run_agent(agent_toml(deployment, port, source)))

            async def blocked_for_a_second() -> str | None:
                body = await scrape(metrics_port)
                age = sample(body, "backhaul_backup_running_oldest_age_seconds", **pair)
                running = sample(body, "backhaul_backups_running", **pair)
                return body if running == 1 and (age or 0) >= 1.0 else None

            during = await eventually(blocked_for_a_second, "the blocked dump to show as running",
                                      every=0.1)  # fmt: skip
            run = await agent
            elapsed = time.monotonic() - started
            after = await scrape(metrics_port)
    finally:
        with locker.cursor() as cursor:
            cursor.execute("UNLOCK TABLES")
        locker.close()

    assert run.returncode == 5, run.stdout + run.stderr
    assert f"FAILED  main/{STALLED}: dump stalled: no bytes for 2 s" in run.stderr
    assert "Traceback" not in run.stderr
    assert 2 <= elapsed < 30
    assert sample(during, "backhaul_backup_last_attempt_success", **pair) is None
    assert sample(after, "backhaul_backups_running", **pair) == 0
    assert sample(after, "backhaul_backup_running_oldest_age_seconds", **pair) == 0
    assert sample(after, "backhaul_backups_total", result="failure", reason="stall", **pair) == 1
    assert sample(after, "backhaul_backup_last_attempt_success", **pair) == 0
    collector_log = log_text(deployment.collector_logs)
    assert re.search(
        rf"backup db1/{STALLED} \[\w+\][^\n]* failed \(stall\): agent aborted: dump stalled",
        collector_log,
    ), collector_log
    assert stored_files(deployment.store) == []


# --------------------------------------------------------------------------- unreachable


class Plug:
    """A loopback TCP forwarder in front of the collector that a test pulls and puts back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    async def __aenter__(self) -> Plug:
        await self.insert()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.pull()

    async def insert(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def pull(self) -> None:
        """Refuse new connections and cut the open ones, as a dead collector host would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports |= {writer.transport, up_writer.transport}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class HungDatabase:
    """A port that accepts connections like a database server, says nothing, and drops
    them when told: a database host that hangs and then fails."""

    def __init__(self) -> None:
        self.port = 0
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HungDatabase:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connected.set()
        await reader.read()  # hold the connection until the client or drop() ends it

    def drop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


async def test_unreachable_collector_is_retried_then_the_run_fails_clearly(
    databases: MariaDBServer, deployment: Deployment, tmp_path: Path
) -> None:
    """Nothing listens: the agent retries with growing waits, then exits 4 with one line."""
    port = free_port()
    config = agent_toml(deployment, port, ward_source(databases, tmp_path, databases.root_password))
    started = time.monotonic()
    run = await run_agent(config)
    elapsed = time.monotonic() - started

    assert run.returncode == 4, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"backhaul-agent: cannot reach collector 127.0.0.1:{port}")
    assert f"gave up after {RETRY.attempts} attempts" in lines[0]
    assert RETRY.total_delay <= elapsed < RETRY.total_delay + 30
    agent_log = log_text(deployment.agent_logs)
    for attempt in range(1, RETRY.attempts):
        wait = RETRY.delay(attempt)
        assert (
            f"connecting to collector 127.0.0.1:{port} failed "
            f"(attempt {attempt} of {RETRY.attempts})"
        ) in agent_log
        assert f"retrying in {wait:.1f} s" in agent_log
    assert "backup run failed: cannot reach collector" in agent_log
    assert final_files(deployment.store) == []


async def test_report_waits_for_a_collector_that_comes_back(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The collector goes away while the database hangs; the failure REPORT is retried,
    and reaches the collector once it is reachable again."""
    pw = password_file(tmp_path, "unused")
    async with (
        running_collector(collector_toml(deployment)) as (_, collector_port),
        Plug(collector_port) as plug,
        HungDatabase() as database,
    ):
        source = mysql_source(database.port, f'["{WARD}"]', password_file=pw)
        agent = asyncio.create_task(run_agent(agent_toml(deployment, plug.port, source)))
        await asyncio.wait_for(database.connected.wait(), 60)  # connected, now in preflight

        async def connected() -> bool:  # the agent connects while its preflight hangs
            return "agent db1 authenticated" in log_text(deployment.collector_logs)

        await eventually(connected, "the agent to connect to the collector", every=0.05)
        await plug.pull()
        database.drop()

        async def retrying() -> bool:
            return "retrying in" in log_text(deployment.agent_logs)

        await eventually(retrying, "the agent to retry its report", every=0.05)
        await plug.insert()
        run = await agent
        collector_log = log_text(deployment.collector_logs)

    assert run.returncode == 5, run.stdout + run.stderr
    assert f"FAILED  main/{WARD}: lost connection to MySQL server" in run.stderr
    agent_log = log_text(deployment.agent_logs)
    assert (
        f"reporting the failure of main/{WARD} to the collector failed "
        f"(attempt 1 of {RETRY.attempts})"
    ) in agent_log
    assert f"reported the failure of main/{WARD} to the collector" in agent_log
    assert f"agent db1 reports failure (dump) for {WARD}" in collector_log
