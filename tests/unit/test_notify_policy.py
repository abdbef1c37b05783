"""Notification policy, message formatting and [notify] config parsing, without sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from collector.report.notify import (
    DeliveryError,
    Event,
    EventKind,
    Notification,
    Notifier,
    NotifyConfig,
    NotifyPolicy,
    parse_notify_config,
)
from common.config import Table
from common.errors import ConfigError

SOURCE = "/etc/backhaul/collector.toml"
WHEN = datetime(2026, 11, 26, 2, 0, 13, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(kind: EventKind = "failure", agent: str = "db-vm-1", database: str = "hospital") -> Event:
    return Event(
        kind=kind,
        agent=agent,
        database=database,
        reason="dump" if kind == "failure" else "ok",
        message="mariadb-dump exited with status 2" if kind == "failure" else "stored",
        backup=None if kind == "failure" else "hospital_20261126.sql.zst",
        time=WHEN,
        collector="backup-vm",
    )


# --------------------------------------------------------------------------- policy


def test_first_failure_is_sent() -> None:
    policy = NotifyPolicy(3600, FakeClock())
    assert policy.decide(event()) == Notification(event(), 0)


def test_repeated_failures_within_interval_are_suppressed_and_counted() -> None:
    clock = FakeClock()
    policy = NotifyPolicy(3600, clock)
    assert policy.decide(event()) is not None
    for _ in range(4):
        clock.now += 60
        assert policy.decide(event()) is None
    clock.now += 3600
    sent = policy.decide(event())
    assert sent is not None
    assert sent.suppressed == 4


def test_count_resets_after_a_summarising_message() -> None:
    clock = FakeClock()
    policy = NotifyPolicy(10, clock)
    policy.decide(event())
    policy.decide(event())
    clock.now += 10
    assert policy.decide(event()) == Notification(event(), 1)
    clock.now += 1
    assert policy.decide(event()) is None
    clock.now += 10
    assert policy.decide(event()) == Notification(event(), 1)


def test_recovery_after_failures_is_always_sent_with_the_suppressed_count() -> None:
    clock = FakeClock()
    policy = NotifyPolicy(3600, clock)
    policy.decide(event())
    policy.decide(event())
    policy.decide(event())
    clock.now += 1
    assert policy.decide(event("recovery")) == Notification(event("recovery"), 2)


def test_success_without_prior_failure_sends_nothing() -> None:
    policy = NotifyPolicy(3600, FakeClock())
    assert policy.decide(event("recovery")) is None
    policy.decide(event())
    policy.decide(event("recovery"))
    assert policy.decide(event("recovery")) is None


def test_failure_after_recovery_is_sent_even_within_interval() -> None:
    """The administrator's last message said "recovered", so a new failure must go out."""
    clock = FakeClock()
    policy = NotifyPolicy(3600, clock)
    policy.decide(event())
    clock.now += 1
    policy.decide(event("recovery"))
    clock.now += 1
    assert policy.decide(event()) == Notification(event(), 0)


def test_pairs_are_rate_limited_independently() -> None:
    policy = NotifyPolicy(3600, FakeClock())
    assert policy.decide(event(database="hospital")) is not None
    assert policy.decide(event(database="billing")) is not None
    assert policy.decide(event(agent="db-vm-2")) is not None
    assert policy.decide(event(database="hospital")) is None


def test_zero_interval_sends_every_failure() -> None:
    policy = NotifyPolicy(0, FakeClock())
    assert all(policy.decide(event()) is not None for _ in range(3))


# --------------------------------------------------------------------------- formatting


def test_subject_names_database_agent_and_reason() -> None:
    assert Notification(event()).subject() == "[backhaul] FAILED hospital on db-vm-1: dump"
    assert Notification(event("recovery")).subject() == "[backhaul] RECOVERED hospital on db-vm-1"
    assert Notification(event(), 9).subject().endswith("(+9 suppressed)")


def test_hostile_names_cannot_inject_headers_or_lines() -> None:
    hostile = event(database="x\r\nBcc: victim@example.org", agent="a\x1b[2J")
    note = Notification(hostile)
    assert "\r" not in note.subject() and "\n" not in note.subject()
    assert "\x1b" not in note.body()
    assert not any(line.startswith("Bcc:") for line in note.body().splitlines())
    assert "x\\r\\nBcc: victim@example.org" in note.body()
    assert note.to_json()["database"] == "x\r\nBcc: victim@example.org"


def test_body_lists_every_field() -> None:
    body = Notification(event(), 3).body()
    for text in (
        "FAILED",
        "db-vm-1",
        "hospital",
        "dump",
        "mariadb-dump exited with status 2",
        "2026-11-26 02:00:13",
        "backup-vm",
        "Suppressed:  3",
    ):
        assert text in body


def test_json_schema_is_stable() -> None:
    assert Notification(event("recovery"), 2).to_json() == {
        "kind": "recovery",
        "agent": "db-vm-1",
        "database": "hospital",
        "reason": "ok",
        "message": "stored",
        "backup": "hospital_20261126.sql.zst",
        "time": "2026-11-26T02:00:13Z",
        "collector": "backup-vm",
        "suppressed": 2,
    }


def test_event_time_is_normalised_to_utc() -> None:
    naive = Event("failure", "a", "d", "dump", "m", None, datetime(2026, 1, 1, 3), "c")
    assert naive.time.tzinfo is UTC


# --------------------------------------------------------------------------- notifier with fakes


class Recorder:
    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def sent(self, channel: str) -> None:
        self.calls.put_nowait(("sent", channel))

    def failed(self, channel: str) -> None:
        self.calls.put_nowait(("failed", channel))

    async def next(self) -> tuple[str, str]:
        return await asyncio.wait_for(self.calls.get(), 5)


class FakeChannel:
    name = "webhook"
    label = "fake://hook/…"

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.delivered: list[Notification] = []

    async def start(self) -> None:
        return None

    async def send(self, notification: Notification) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise DeliveryError("HTTP 503")
        self.delivered.append(notification)

    async def close(self) -> None:
        return None


def fast_config(**overrides: float) -> NotifyConfig:
    values: dict[str, float] = {"retries": 3, "timeout": 1.0, "backoff": 0.0} | overrides
    return NotifyConfig(
        webhooks=("http://127.0.0.1:9/hook",),
        retries=int(values["retries"]),
        timeout=values["timeout"],
        backoff=values["backoff"],
        queue_size=int(values.get("queue_size", 100)),
    )


async def test_notifier_retries_then_reports_sent() -> None:
    rec, channel = Recorder(), FakeChannel(failures=2)
    notifier = Notifier(fast_config(), rec.sent, rec.failed, channels=[channel])
    await notifier.start()
    notifier.notify(event())
    assert await rec.next() == ("sent", "webhook")
    assert channel.attempts == 3
    await notifier.close(1)


async def test_notifier_reports_failed_after_all_retries() -> None:
    rec, channel = Recorder(), FakeChannel(failures=99)
    notifier = Notifier(fast_config(retries=2), rec.sent, rec.failed, channels=[channel])
    await notifier.start()
    notifier.notify(event())
    assert await rec.next() == ("failed", "webhook")
    assert channel.attempts == 3
    await notifier.close(1)


async def test_full_queue_drops_and_counts_failed_without_blocking() -> None:
    rec = Recorder()
    notifier = Notifier(fast_config(queue_size=1), rec.sent, rec.failed, channels=[FakeChannel()])
    start = time.monotonic()
    for db in ("a", "b", "c"):
        notifier.notify(event(database=db))
    assert time.monotonic() - start < 0.05
    assert [await rec.next(), await rec.next()] == [("failed", "webhook")] * 2
    await notifier.close(0.1)
    assert await rec.next() == ("failed", "webhook")


async def test_notify_after_close_counts_failed() -> None:
    rec = Recorder()
    notifier = Notifier(fast_config(), rec.sent, rec.failed, channels=[FakeChannel()])
    await notifier.start()
    await notifier.close(1)
    notifier.notify(event())
    assert await rec.next() == ("failed", "webhook")


async def test_notify_never_raises_even_if_callbacks_do() -> None:
    def explode(channel: str) -> None:
        raise RuntimeError(channel)

    notifier = Notifier(fast_config(queue_size=1), explode, explode, channels=[FakeChannel()])
    notifier.notify(event(database="a"))
    notifier.notify(event(database="b"))
    await notifier.close(0)


async def test_notifier_applies_policy_with_injected_clock() -> None:
    rec, channel, clock = Recorder(), FakeChannel(), FakeClock()
    notifier = Notifier(fast_config(), rec.sent, rec.failed, clock, channels=[channel])
    await notifier.start()
    for _ in range(5):
        notifier.notify(event())
    notifier.notify(event("recovery"))
    notifier.notify(event("recovery"))
    await notifier.close(5)
    assert [(n.event.kind, n.suppressed) for n in channel.delivered] == [
        ("failure", 0),
        ("recovery", 4),
    ]


def test_notifier_without_channels_does_nothing() -> None:
    rec = Recorder()
    Notifier(NotifyConfig(), rec.sent, rec.failed).notify(event())
    assert rec.calls.empty()


# --------------------------------------------------------------------------- config


def password_file(tmp_path: Path, text: str = "s3cret\n", mode: int = 0o600) -> Path:
    path = tmp_path / "smtp-password"
    path.write_text(text)
    path.chmod(mode)
    return path


def email_table(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "host": "smtp.example.org",
        "sender": "backhaul@example.org",
        "recipients": ["admin@example.org"],
        **extra,
    }


def read_notify(table: Mapping[str, object], source: str | Path = SOURCE) -> NotifyConfig:
    """Read ``table`` as the [notify] table of ``source``, as load_collector_config does."""
    return parse_notify_config(Table(table, Path(source), "notify."))


def parse_error(table: Mapping[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        read_notify(table)
    return str(info.value)


def test_full_config_parses(tmp_path: Path) -> None:
    pw = password_file(tmp_path)
    cfg = read_notify(
        {
            "webhooks": ["https://hooks.example.org/T0/secret-token"],
            "min_interval": 600,
            "retries": 2,
            "timeout": 5.5,
            "email": email_table(tmp_path, username="backhaul", password_file=str(pw)),
        },
        str(tmp_path / "collector.toml"),
    )
    assert cfg.webhooks == ("https://hooks.example.org/T0/secret-token",)
    assert (cfg.min_interval, cfg.retries, cfg.timeout) == (600.0, 2, 5.5)
    assert cfg.email is not None
    assert cfg.email.password == "s3cret"
    assert (cfg.email.port, cfg.email.starttls) == (587, True)


def test_defaults_when_table_is_empty() -> None:
    cfg = read_notify({})
    assert cfg == NotifyConfig()
    assert (cfg.min_interval, cfg.webhooks, cfg.email) == (3600.0, (), None)


def test_repr_hides_password_and_webhook_token(tmp_path: Path) -> None:
    pw = password_file(tmp_path)
    cfg = read_notify(
        {
            "webhooks": ["https://hooks.example.org/T0/secret-token"],
            "email": email_table(tmp_path, username="u", password_file=str(pw)),
        },
        SOURCE,
    )
    text = repr(cfg)
    assert "s3cret" not in text
    assert "secret-token" not in text
    assert "hooks.example.org" in text


def test_relative_password_file_is_found_beside_the_config(tmp_path: Path) -> None:
    password_file(tmp_path)
    table = {"email": email_table(tmp_path, username="u", password_file="smtp-password")}
    cfg = read_notify(table, tmp_path / "collector.toml")
    assert cfg.email is not None and cfg.email.password == "s3cret"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"webhook": ["http://x"]}, "notify.webhook"),
        ({"min_intervall": 5}, "notify.min_intervall"),
        ({"email": {"host": "h", "sender": "a@b", "recipients": ["a@b"], "tls": True}}, "tls"),
    ],
)
def test_unknown_key_is_named_with_the_file(table: Mapping[str, object], key: str) -> None:
    message = parse_error(table)
    assert SOURCE in message
    assert key in message
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"retries": "3"}, "notify.retries"),
        ({"retries": True}, "notify.retries"),
        ({"retries": 1.5}, "notify.retries"),
        ({"min_interval": "1h"}, "notify.min_interval"),
        ({"timeout": float("nan")}, "notify.timeout"),
        ({"timeout": 0}, "notify.timeout"),
        ({"min_interval": -1}, "notify.min_interval"),
        ({"webhooks": "http://x"}, "notify.webhooks"),
        ({"webhooks": [42]}, "notify.webhooks"),
        ({"webhooks": ["ftp://x/y"]}, "notify.webhooks"),
        ({"webhooks": ["http://x:99999/"]}, "notify.webhooks"),
        ({"webhooks": ["http://x/", "http://x/"]}, "notify.webhooks"),
        ({"email": "smtp.example.org"}, "notify.email"),
        ({"email": {"host": "h", "sender": "a@b", "recipients": "a@b"}}, "notify.email.recipients"),
        ({"email": {"host": "h", "sender": "a@b", "recipients": ["x"]}}, "notify.email.recipients"),
        ({"email": {"host": "h", "sender": "a\n@b", "recipients": ["a@b"]}}, "notify.email.sender"),
        ({"email": {"sender": "a@b", "recipients": ["a@b"]}}, "notify.email.host"),
        (
            {"email": {"host": "h", "sender": "a@b", "recipients": ["a@b"], "port": "25"}},
            "notify.email.port",
        ),
        (
            {"email": {"host": "h", "sender": "a@b", "recipients": ["a@b"], "starttls": "yes"}},
            "notify.email.starttls",
        ),
    ],
)
def test_wrong_type_or_value_is_named_with_the_file(table: Mapping[str, object], key: str) -> None:
    message = parse_error(table)
    assert SOURCE in message
    assert key in message


def test_missing_password_file_names_the_file_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"
    message = parse_error(
        {"email": email_table(tmp_path, username="u", password_file=str(missing))}
    )
    assert SOURCE in message
    assert "notify.email.password_file" in message
    assert str(missing) in message


def test_world_readable_password_file_is_refused(tmp_path: Path) -> None:
    pw = password_file(tmp_path, mode=0o644)
    message = parse_error({"email": email_table(tmp_path, username="u", password_file=str(pw))})
    assert "readable by everyone" in message and str(pw) in message


@pytest.mark.parametrize("text", ["", "\n", "one\ntwo\n"])
def test_password_file_must_hold_one_line(tmp_path: Path, text: str) -> None:
    pw = password_file(tmp_path, text=text)
    message = parse_error({"email": email_table(tmp_path, username="u", password_file=str(pw))})
    assert "exactly one line" in message and "notify.email.password_file" in message


def test_username_needs_password_file(tmp_path: Path) -> None:
    assert "notify.email.username" in parse_error({"email": email_table(tmp_path, username="u")})


def test_auth_without_starttls_to_a_remote_relay_is_refused(tmp_path: Path) -> None:
    pw = password_file(tmp_path)
    table = email_table(tmp_path, username="u", password_file=str(pw), starttls=False)
    assert "notify.email.starttls" in parse_error({"email": table})


def test_auth_without_starttls_on_loopback_is_allowed(tmp_path: Path) -> None:
    pw = password_file(tmp_path)
    table = email_table(tmp_path, username="u", password_file=str(pw), starttls=False)
    table["host"] = "127.0.0.1"
    cfg = read_notify({"email": table})
    assert cfg.email is not None and cfg.email.port == 25


def test_unloadable_cafile_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    message = parse_error({"email": email_table(tmp_path, cafile=str(bad))})
    assert "notify.email.cafile" in message and SOURCE in message
