"""Notifications delivered to a real aiohttp webhook receiver and a real aiosmtpd server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from collector.report.notify import (
    EmailConfig,
    Event,
    EventKind,
    Notifier,
    NotifyConfig,
    parse_notify_config,
)
from common.config import Table

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 11, 26, 2, 0, 13, tzinfo=UTC)
SMTP_USER = "backhaul"
SMTP_PASSWORD = "correct horse battery"


def event(kind: EventKind = "failure", message: str = "mariadb-dump exited with 2") -> Event:
    return Event(
        kind=kind,
        agent="db-vm-1",
        database="hospital",
        reason="dump" if kind == "failure" else "ok",
        message=message,
        backup=None if kind == "failure" else "hospital_20261126.sql.zst",
        time=WHEN,
        collector="backup-vm",
    )


class Recorder:
    """Collects on_sent/on_failed calls so tests can await them instead of sleeping."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def sent(self, channel: str) -> None:
        self.calls.put_nowait(("sent", channel))

    def failed(self, channel: str) -> None:
        self.calls.put_nowait(("failed", channel))

    async def next(self) -> tuple[str, str]:
        return await asyncio.wait_for(self.calls.get(), 5)


# --------------------------------------------------------------------------- webhook receiver


class HookServer:
    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.release = asyncio.Event()
        self.requests = 0
        self.bodies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.hang:
            await self.release.wait()
        self.bodies.put_nowait(await request.json())
        return web.Response(status=self.status)

    async def next_body(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.bodies.get(), 5)


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    server = HookServer()
    app = web.Application()
    app.router.add_post("/hook/secret-token", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/hook/secret-token"
    yield server
    server.release.set()
    await runner.cleanup()


# --------------------------------------------------------------------------- SMTP receiver


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    authenticated: bool


class MailHandler:
    def __init__(self) -> None:
        self.mails: asyncio.Queue[Received] = asyncio.Queue()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.content
        assert isinstance(raw, bytes)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.put_nowait(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                message,
                bool(session.authenticated),
            )
        )
        return "250 OK"

    async def next_mail(self) -> Received:
        return await asyncio.wait_for(self.mails.get(), 5)


def check_login(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == LoginPassword(
        SMTP_USER.encode(), SMTP_PASSWORD.encode()
    )
    # handled=False: let aiosmtpd send the 235/535 reply itself.
    return AuthResult(success=ok, handled=False)


async def start_smtp(
    handler: MailHandler, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        if tls is None:
            return SMTP(handler, hostname="localhost", loop=loop)
        return SMTP(
            handler,
            hostname="localhost",
            loop=loop,
            tls_context=tls,
            require_starttls=True,
            authenticator=check_login,
            auth_required=True,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, signed by its own key: the client trusts it as its CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backhaul test relay")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "relay.pem", folder / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def plain_email(port: int) -> EmailConfig:
    return EmailConfig(
        host="127.0.0.1",
        port=port,
        sender="backhaul@backup-vm.example",
        recipients=("admin@example.org", "oncall@example.org"),
        starttls=False,
    )


def config(
    webhooks: tuple[str, ...] = (),
    mail: EmailConfig | None = None,
    retries: int = 2,
    timeout: float = 2.0,
) -> NotifyConfig:
    return NotifyConfig(
        webhooks, mail, min_interval=3600, retries=retries, timeout=timeout, backoff=0.01
    )


# --------------------------------------------------------------------------- tests


async def test_webhook_receives_failure_as_json(hook: HookServer) -> None:
    rec = Recorder()
    notifier = Notifier(config((hook.url,)), rec.sent, rec.failed)
    await notifier.start()
    notifier.notify(event(message="Access denied for user 'backup'@'localhost'"))
    body = await hook.next_body()
    assert body == {
        "kind": "failure",
        "agent": "db-vm-1",
        "database": "hospital",
        "reason": "dump",
        "message": "Access denied for user 'backup'@'localhost'",
        "backup": None,
        "time": "2026-11-26T02:00:13Z",
        "collector": "backup-vm",
        "suppressed": 0,
    }
    assert await rec.next() == ("sent", "webhook")
    await notifier.close(1)


async def test_email_has_subject_body_and_recipients() -> None:
    handler = MailHandler()
    server, port = await start_smtp(handler)
    rec = Recorder()
    notifier = Notifier(config(mail=plain_email(port)), rec.sent, rec.failed)
    await notifier.start()
    try:
        notifier.notify(event())
        mail = await handler.next_mail()
        assert await rec.next() == ("sent", "email")
    finally:
        await notifier.close(1)
        server.close()
    assert mail.mail_from == "backhaul@backup-vm.example"
    assert mail.rcpt_tos == ["admin@example.org", "oncall@example.org"]
    assert mail.message["Subject"] == "[backhaul] FAILED hospital on db-vm-1: dump"
    assert mail.message["To"] == "admin@example.org, oncall@example.org"
    body = mail.message.get_content()
    for text in ("FAILED", "db-vm-1", "hospital", "mariadb-dump exited with 2", "backup-vm"):
        assert text in body
    assert "2026-11-26 02:00:13" in body


async def test_email_with_starttls_and_auth(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = MailHandler()
    server, port = await start_smtp(handler, tls)
    (tmp_path / "smtp-password").write_text(SMTP_PASSWORD + "\n")
    (tmp_path / "smtp-password").chmod(0o600)
    table = {
        "retries": 0,
        "email": {
            "host": "127.0.0.1",
            "port": port,
            "sender": "backhaul@backup-vm.example",
            "recipients": ["admin@example.org"],
            "starttls": True,
            "username": SMTP_USER,
            "password_file": "smtp-password",
            "cafile": cert.name,
        },
    }
    cfg = parse_notify_config(Table(table, tmp_path / "collector.toml", "notify."))
    rec = Recorder()
    notifier = Notifier(cfg, rec.sent, rec.failed)
    await notifier.start()
    try:
        notifier.notify(event())
        notifier.notify(event("recovery"))
        failed, recovered = await handler.next_mail(), await handler.next_mail()
    finally:
        await notifier.close(1)
        server.close()
    assert failed.authenticated and recovered.authenticated
    assert failed.message["Subject"] == "[backhaul] FAILED hospital on db-vm-1: dump"
    assert recovered.message["Subject"] == "[backhaul] RECOVERED hospital on db-vm-1"
    assert "hospital_20261126.sql.zst" in recovered.message.get_content()


async def test_wrong_smtp_password_fails_without_logging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server, port = await start_smtp(MailHandler(), tls)
    mail = EmailConfig(
        "127.0.0.1",
        port,
        "backhaul@backup-vm.example",
        ("admin@example.org",),
        starttls=True,
        username=SMTP_USER,
        password="wrong-but-secret",
        cafile=cert,
    )
    rec = Recorder()
    notifier = Notifier(config(mail=mail, retries=1), rec.sent, rec.failed)
    await notifier.start()
    try:
        with caplog.at_level(logging.WARNING, logger="collector.report.notify"):
            notifier.notify(event())
            assert await rec.next() == ("failed", "email")
    finally:
        await notifier.close(1)
        server.close()
    assert "SMTPAuthenticationError" in caplog.text
    assert "wrong-but-secret" not in caplog.text
    assert "wrong-but-secret" not in repr(mail)


async def test_untrusted_relay_certificate_fails(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = MailHandler()
    server, port = await start_smtp(handler, tls)
    mail = EmailConfig("127.0.0.1", port, "b@example.org", ("a@example.org",), starttls=True)
    rec = Recorder()
    notifier = Notifier(config(mail=mail, retries=0), rec.sent, rec.failed)
    await notifier.start()
    try:
        notifier.notify(event())
        assert await rec.next() == ("failed", "email")
    finally:
        await notifier.close(1)
        server.close()
    assert handler.mails.empty()


async def test_webhook_500_is_retried_then_reported_failed(
    hook: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    hook.status = 500
    rec = Recorder()
    notifier = Notifier(config((hook.url,), retries=2), rec.sent, rec.failed)
    await notifier.start()
    with caplog.at_level(logging.WARNING, logger="collector.report.notify"):
        notifier.notify(event())
        assert await rec.next() == ("failed", "webhook")
    await notifier.close(1)
    assert hook.requests == 3
    assert rec.calls.empty()
    lines = [r.getMessage() for r in caplog.records if r.name == "collector.report.notify"]
    assert len(lines) == 1
    assert "HTTP 500" in lines[0] and "3 attempt" in lines[0]
    assert "secret-token" not in lines[0]


async def test_hanging_webhook_does_not_block_notify(hook: HookServer) -> None:
    hook.hang = True
    rec = Recorder()
    notifier = Notifier(config((hook.url,), retries=0, timeout=0.3), rec.sent, rec.failed)
    await notifier.start()
    started = time.monotonic()
    notifier.notify(event())
    assert time.monotonic() - started < 0.01
    assert await rec.next() == ("failed", "webhook")
    assert time.monotonic() - started < 2
    await notifier.close(1)


async def test_close_counts_undelivered_notifications_as_failed(hook: HookServer) -> None:
    hook.hang = True
    rec = Recorder()
    notifier = Notifier(config((hook.url,), retries=0, timeout=30), rec.sent, rec.failed)
    await notifier.start()
    notifier.notify(event())
    started = time.monotonic()
    await notifier.close(0.2)
    assert time.monotonic() - started < 2
    assert await rec.next() == ("failed", "webhook")


async def test_flapping_sends_one_notification_then_a_suppressed_count(hook: HookServer) -> None:
    clock_now = [0.0]
    rec = Recorder()
    notifier = Notifier(config((hook.url,)), rec.sent, rec.failed, clock=lambda: clock_now[0])
    await notifier.start()
    for _ in range(10):
        notifier.notify(event())
        clock_now[0] += 60
    first = await hook.next_body()
    clock_now[0] += 3600
    notifier.notify(event())
    notifier.notify(event())
    notifier.notify(event("recovery"))
    second, third = await hook.next_body(), await hook.next_body()
    await notifier.close(1)
    assert (first["kind"], first["suppressed"]) == ("failure", 0)
    assert (second["kind"], second["suppressed"]) == ("failure", 9)
    assert (third["kind"], third["suppressed"]) == ("recovery", 1)
    assert hook.requests == 3
