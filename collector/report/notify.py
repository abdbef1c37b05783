"""Direct failure/recovery notifications (webhook, e-mail) for sites without Alertmanager.

The collector calls :meth:`Notifier.notify` for every backup outcome it wants the
administrator to hear about. ``notify`` never blocks and never raises: a pure policy
decides what is worth sending (first failure, rate-limited repeats, recovery), and a
background task delivers through each configured channel with retries, so a slow or
broken mail server can never fail or delay a backup.

Configuration (``collector.toml``)::

    [notify]
    webhooks = ["https://hooks.example/backhaul"]
    min_interval = 3600      # seconds between repeated failure messages per (agent, database)
    retries = 3              # extra attempts per delivery, with exponential backoff
    timeout = 10             # seconds per attempt
    backoff = 1              # first retry delay in seconds; doubles each attempt
    queue_size = 100         # pending messages; beyond this they are dropped and counted

    [notify.email]
    host = "smtp.example"
    port = 587
    sender = "backhaul@example"
    recipients = ["admin@example"]
    starttls = true          # default; false only for a relay on loopback
    username = "backhaul"    # AUTH only when set; needs password_file
    password_file = "smtp-password"   # relative to the configuration file
    cafile = "relay-ca.pem"  # optional: trust this CA instead of the system store
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import math
import smtplib
import socket
import ssl
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

import aiohttp

from common.errors import ConfigError

logger = logging.getLogger(__name__)

EventKind = Literal["failure", "recovery"]

_NOTIFY_KEYS = frozenset(
    {"webhooks", "email", "min_interval", "retries", "timeout", "backoff", "queue_size"}
)
_EMAIL_KEYS = frozenset(
    {"host", "port", "sender", "recipients", "starttls", "username", "password_file", "cafile"}
)
_MAX_BACKOFF = 300.0
_SIMPLE_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Control, format (bidi overrides, zero-width), line/paragraph separators, surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def escape_control(s: str) -> str:
    """Return ``s`` with every control or invisible character shown as a visible escape.

    Newlines, carriage returns, escape sequences, bidi overrides, zero-width characters
    and lone surrogates from untrusted names cannot then forge lines in a log, headers in
    an e-mail or hide text. Backslashes are doubled so the result is unambiguous.
    """
    out: list[str] = []
    for ch in s:
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            code = ord(ch)
            if code <= 0xFF:
                out.append(f"\\x{code:02x}")
            elif code <= 0xFFFF:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


# --------------------------------------------------------------------------- config


def _fail(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}")


def _number(table: Mapping[str, object], key: str, default: float, source: str, path: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(source, f"{path}.{key}", f"expected a number, got {value!r}")
    return float(value)


def _integer(table: Mapping[str, object], key: str, default: int, source: str, path: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"{path}.{key}", f"expected an integer, got {value!r}")
    return value


def _text(value: object, source: str, key: str, *, spaces: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(source, key, f"expected a non-empty string, got {value!r}")
    for ch in value:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES or (ch.isspace() and not spaces):
            raise _fail(source, key, f"must not contain spaces or control characters: {value!r}")
    return value


def _address(value: object, source: str, key: str) -> str:
    text = _text(value, source, key)
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or len(text) > 254 or "<" in text or ">" in text:
        raise _fail(
            source, key, f"expected a plain e-mail address like admin@example.org: {text!r}"
        )
    return text


def _check_keys(
    table: Mapping[str, object], allowed: frozenset[str], source: str, path: str
) -> None:
    for key in table:
        if key not in allowed:
            raise _fail(
                source, f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
            )


def _relative_file(value: object, source: str, key: str) -> Path:
    path = Path(_text(value, source, key, spaces=True))
    return path if path.is_absolute() else Path(source).parent / path


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebhookConfig:
    """One webhook endpoint; its URL may embed a token, so logs and repr show only the host."""

    url: str

    @classmethod
    def parse(cls, value: object, source: str, key: str) -> WebhookConfig:
        """Validate an ``http(s)://host[:port]/path`` URL; raises ConfigError naming the key."""
        url = _text(value, source, key)
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 -- property that raises ValueError on a bad port
        except ValueError as exc:
            raise _fail(source, key, f"bad port in webhook URL: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _fail(source, key, "expected an http:// or https:// URL with a host name")
        return cls(url)

    @property
    def redacted(self) -> str:
        """Scheme, host and port only: what may appear in a log line."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}/…"

    def __repr__(self) -> str:
        return f"WebhookConfig(url={self.redacted!r})"


@dataclass(frozen=True)
class EmailConfig:
    """SMTP relay settings; ``password`` is never shown by repr."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    starttls: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    cafile: Path | None = None

    @staticmethod
    def read_password(path: Path, source: str) -> str:
        """Read an SMTP password from ``path`` (one line; trailing newline ignored).

        Raises ConfigError naming the file when it is missing, unreadable, readable by
        everyone, empty or more than one line.
        """
        key = "notify.email.password_file"
        try:
            if path.stat().st_mode & 0o004:
                raise _fail(source, key, f"{path} is readable by everyone; chmod o-r it")
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise _fail(source, key, f"cannot read {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise _fail(source, key, f"{path} is not UTF-8 text") from exc
        password = text.removesuffix("\n").removesuffix("\r")
        if not password or "\n" in password or "\r" in password:
            raise _fail(source, key, f"{path} must hold the password on exactly one line")
        return password

    @classmethod
    def from_table(cls, table: Mapping[str, object], source: str) -> EmailConfig:
        """Build from the ``[notify.email]`` table; raises ConfigError naming file and key."""
        p = "notify.email"
        _check_keys(table, _EMAIL_KEYS, source, p)
        for required in ("host", "sender", "recipients"):
            if required not in table:
                raise _fail(source, f"{p}.{required}", "missing required key")
        host = _text(table["host"], source, f"{p}.host")
        starttls = table.get("starttls", True)
        if not isinstance(starttls, bool):
            raise _fail(source, f"{p}.starttls", f"expected true or false, got {starttls!r}")
        port = _integer(table, "port", 587 if starttls else 25, source, p)
        if not 0 < port < 65536:
            raise _fail(source, f"{p}.port", f"expected 1-65535, got {port}")
        raw_rcpt = table["recipients"]
        if not isinstance(raw_rcpt, list) or not raw_rcpt:
            raise _fail(source, f"{p}.recipients", "expected a non-empty list of addresses")
        recipients = tuple(_address(r, source, f"{p}.recipients") for r in raw_rcpt)
        username = table.get("username")
        if username is not None:
            username = _text(username, source, f"{p}.username")
        password_file: Path | None = None
        password: str | None = None
        if "password_file" in table:
            password_file = _relative_file(table["password_file"], source, f"{p}.password_file")
            password = cls.read_password(password_file, source)
        if (username is None) != (password is None):
            raise _fail(source, f"{p}.username", "username and password_file go together")
        if username is not None and not starttls and not _is_loopback(host):
            raise _fail(
                source, f"{p}.starttls", "AUTH without STARTTLS would send the password in clear"
            )
        cafile: Path | None = None
        if "cafile" in table:
            cafile = _relative_file(table["cafile"], source, f"{p}.cafile")
            try:
                ssl.create_default_context(cafile=str(cafile))
            except (OSError, ssl.SSLError) as exc:
                raise _fail(source, f"{p}.cafile", f"cannot load {cafile}: {exc}") from exc
        sender = _address(table["sender"], source, f"{p}.sender")
        return cls(
            host, port, sender, recipients, starttls, username, password, password_file, cafile
        )


@dataclass(frozen=True)
class NotifyConfig:
    """The ``[notify]`` table; no webhooks and no e-mail means notifications are off."""

    webhooks: tuple[str, ...] = ()
    email: EmailConfig | None = None
    min_interval: float = 3600.0
    retries: int = 3
    timeout: float = 10.0
    backoff: float = 1.0
    queue_size: int = 100

    def __repr__(self) -> str:
        hooks = tuple(WebhookConfig(u).redacted for u in self.webhooks)
        return (
            f"NotifyConfig(webhooks={hooks!r}, email={self.email!r}, "
            f"min_interval={self.min_interval!r}, retries={self.retries!r}, "
            f"timeout={self.timeout!r}, backoff={self.backoff!r}, queue_size={self.queue_size!r})"
        )


def parse_notify_config(table: Mapping[str, object], source: str) -> NotifyConfig:
    """Validate the ``[notify]`` table of ``source`` (the file name, used in messages).

    Raises ConfigError naming the file and the dotted key for an unknown key, a wrong
    type, an out-of-range value, or an unreadable password or CA file.
    """
    _check_keys(table, _NOTIFY_KEYS, source, "notify")
    raw_hooks = table.get("webhooks", [])
    if not isinstance(raw_hooks, list):
        raise _fail(source, "notify.webhooks", "expected a list of URLs")
    hooks = tuple(WebhookConfig.parse(u, source, "notify.webhooks").url for u in raw_hooks)
    if len(set(hooks)) != len(hooks):
        raise _fail(source, "notify.webhooks", "the same URL is listed twice")
    raw_email = table.get("email")
    if raw_email is not None and not isinstance(raw_email, Mapping):
        raise _fail(source, "notify.email", "expected a table [notify.email]")
    email_cfg = None if raw_email is None else EmailConfig.from_table(raw_email, source)
    cfg = NotifyConfig(
        webhooks=hooks,
        email=email_cfg,
        min_interval=_number(table, "min_interval", 3600.0, source, "notify"),
        retries=_integer(table, "retries", 3, source, "notify"),
        timeout=_number(table, "timeout", 10.0, source, "notify"),
        backoff=_number(table, "backoff", 1.0, source, "notify"),
        queue_size=_integer(table, "queue_size", 100, source, "notify"),
    )
    limits = (
        ("min_interval", cfg.min_interval >= 0, ">= 0"),
        ("retries", 0 <= cfg.retries <= 10, "0-10"),
        ("timeout", 0 < cfg.timeout <= 300, "> 0 and <= 300"),
        ("backoff", 0 <= cfg.backoff <= _MAX_BACKOFF, f"0-{_MAX_BACKOFF:g}"),
        ("queue_size", 1 <= cfg.queue_size <= 10_000, "1-10000"),
    )
    for key, ok, expected in limits:
        if not ok:
            raise _fail(source, f"notify.{key}", f"expected {expected}, got {getattr(cfg, key)!r}")
    return cfg


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One backup outcome for (agent, database).

    ``kind="failure"`` reports a failed backup; ``kind="recovery"`` reports a successful
    one and is delivered only when it ends a run of failures. ``time`` is normalised to
    UTC (a naive value is taken as UTC).
    """

    kind: EventKind
    agent: str
    database: str
    reason: str
    message: str
    backup: str | None
    time: datetime
    collector: str

    def __post_init__(self) -> None:
        utc = (
            self.time.replace(tzinfo=UTC) if self.time.tzinfo is None else self.time.astimezone(UTC)
        )
        object.__setattr__(self, "time", utc)


@dataclass(frozen=True)
class Notification:
    """What is delivered: an event plus how many like it were suppressed before it."""

    event: Event
    suppressed: int = 0

    def to_json(self) -> dict[str, object]:
        """The webhook body; values are exact (JSON escapes them), not display-escaped."""
        e = self.event
        return {
            "kind": e.kind,
            "agent": e.agent,
            "database": e.database,
            "reason": e.reason,
            "message": e.message,
            "backup": e.backup,
            "time": e.time.isoformat().replace("+00:00", "Z"),
            "collector": e.collector,
            "suppressed": self.suppressed,
        }

    def subject(self) -> str:
        e = self.event
        where = f"{_clip(escape_control(e.database), 80)} on {_clip(escape_control(e.agent), 80)}"
        if e.kind == "recovery":
            return f"[backhaul] RECOVERED {where}"
        more = f" (+{self.suppressed} suppressed)" if self.suppressed else ""
        return f"[backhaul] FAILED {where}: {_clip(escape_control(e.reason), 40)}{more}"

    def body(self) -> str:
        e = self.event
        if e.kind == "recovery":
            title = "Backhaul: backup RECOVERED (succeeded after earlier failures)"
        else:
            title = "Backhaul: backup FAILED"
        note = f"{self.suppressed} (failures not notified since the previous message)"
        rows = (
            ("Agent", e.agent),
            ("Database", e.database),
            ("Reason", e.reason),
            ("Message", e.message),
            ("Backup", e.backup if e.backup is not None else "-"),
            ("Time (UTC)", e.time.strftime("%Y-%m-%d %H:%M:%S")),
            ("Collector", e.collector),
        )
        lines = [title, ""]
        lines += [
            f"{label + ':':<12} {_clip(escape_control(value), 2000)}" for label, value in rows
        ]
        lines += [f"{'Suppressed:':<12} {note}", ""]
        return "\n".join(lines)


@dataclass
class _PairState:
    last_sent: float
    suppressed: int = 0


class NotifyPolicy:
    """Decides, without I/O, which events become notifications.

    A first failure is sent; further failures of the same (agent, database) within
    ``min_interval`` seconds of the last message are counted, and the count rides on
    the next message. A success after failures is a recovery and is always sent; a
    success with no failure before it sends nothing.
    """

    def __init__(self, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._min_interval = min_interval
        self._clock = clock
        self._failing: dict[tuple[str, str], _PairState] = {}

    def decide(self, event: Event) -> Notification | None:
        key = (event.agent, event.database)
        state = self._failing.get(key)
        if event.kind == "recovery":
            if state is None:
                return None
            del self._failing[key]
            return Notification(event, state.suppressed)
        now = self._clock()
        if state is None:
            self._failing[key] = _PairState(last_sent=now)
            return Notification(event)
        if now - state.last_sent < self._min_interval:
            state.suppressed += 1
            return None
        sent = Notification(event, state.suppressed)
        state.last_sent, state.suppressed = now, 0
        return sent


# --------------------------------------------------------------------------- channels


class DeliveryError(Exception):
    """A channel could not deliver one notification (stays inside this module)."""


class Channel(Protocol):
    """A way to reach the administrator; ``send`` raises on any failure."""

    name: str  # "webhook" or "email": the label for metrics
    label: str  # where it goes, safe to log

    async def start(self) -> None: ...

    async def send(self, notification: Notification) -> None: ...

    async def close(self) -> None: ...


class WebhookChannel:
    """POSTs :meth:`Notification.to_json`; any 2xx answer is success."""

    name = "webhook"

    def __init__(self, webhook: WebhookConfig) -> None:
        self._url = webhook.url
        self.label = webhook.redacted
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "backhaul-collector"})

    async def send(self, notification: Notification) -> None:
        if self._session is None:
            raise DeliveryError("webhook channel used before start()")
        try:
            async with self._session.post(
                self._url, json=notification.to_json(), allow_redirects=False
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise DeliveryError(f"HTTP {resp.status}")
        except aiohttp.ClientError as exc:
            # aiohttp may quote the URL, and a webhook URL often carries a token.
            detail = str(exc).replace(self._url, self.label)
            raise DeliveryError(f"{exc.__class__.__name__}: {detail}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class EmailChannel:
    """Sends a plain-text mail through an SMTP relay with the standard library, in a thread."""

    name = "email"

    def __init__(self, config: EmailConfig, timeout: float) -> None:
        self._config = config
        self._timeout = timeout
        self.label = f"smtp://{config.host}:{config.port}"
        self._helo = socket.gethostname() or "localhost"

    async def start(self) -> None:
        return None

    async def send(self, notification: Notification) -> None:
        await asyncio.to_thread(self._send_blocking, self._message(notification))

    async def close(self) -> None:
        return None

    def _message(self, notification: Notification) -> EmailMessage:
        cfg = self._config
        msg = EmailMessage()
        msg["Subject"] = notification.subject()
        msg["From"] = cfg.sender
        msg["To"] = ", ".join(cfg.recipients)
        msg["Date"] = email.utils.format_datetime(notification.event.time)
        msg["Message-ID"] = email.utils.make_msgid(domain=cfg.sender.rpartition("@")[2])
        msg.set_content(notification.body())
        return msg

    def _send_blocking(self, msg: EmailMessage) -> None:
        cfg = self._config
        with smtplib.SMTP(cfg.host, cfg.port, self._helo, self._timeout) as smtp:
            if cfg.starttls:
                cafile = str(cfg.cafile) if cfg.cafile is not None else None
                smtp.starttls(context=ssl.create_default_context(cafile=cafile))
            if cfg.username is not None and cfg.password is not None:
                smtp.login(cfg.username, cfg.password)
            smtp.send_message(msg, cfg.sender, list(cfg.recipients))


def channels_from_config(config: NotifyConfig) -> list[Channel]:
    """One channel per webhook URL, plus e-mail when configured."""
    channels: list[Channel] = [WebhookChannel(WebhookConfig(u)) for u in config.webhooks]
    if config.email is not None:
        channels.append(EmailChannel(config.email, config.timeout))
    return channels


# --------------------------------------------------------------------------- notifier


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, DeliveryError):
        return escape_control(str(exc))
    return escape_control(
        f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    )


class Notifier:
    """Applies :class:`NotifyPolicy` and delivers notifications in a background task.

    ``on_sent(channel)`` and ``on_failed(channel)`` are called once per delivery with the
    channel name (``"webhook"`` or ``"email"``), e.g. to count it in metrics. Call
    :meth:`notify` from the event loop's thread.
    """

    def __init__(
        self,
        config: NotifyConfig,
        on_sent: Callable[[str], None],
        on_failed: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        channels: Sequence[Channel] | None = None,
    ) -> None:
        self._config = config
        self._on_sent = on_sent
        self._on_failed = on_failed
        self._policy = NotifyPolicy(config.min_interval, clock)
        self._channels = list(channels) if channels is not None else channels_from_config(config)
        self._queue: asyncio.Queue[Notification] = asyncio.Queue(maxsize=config.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def notify(self, event: Event) -> None:
        """Queue what the policy says to send; never blocks, never raises."""
        try:
            if not self._channels:
                return
            notification = self._policy.decide(event)
            if notification is None:
                return
            if self._closed:
                self._drop(notification, "the notifier is closed")
                return
            try:
                self._queue.put_nowait(notification)
            except asyncio.QueueFull:
                self._drop(notification, "the queue is full")
        except Exception:
            logger.exception(
                "notification for %s/%s lost to an internal error",
                escape_control(event.agent),
                escape_control(event.database),
            )

    async def start(self) -> None:
        """Open the channels and start delivering."""
        if self._task is not None:
            raise RuntimeError("Notifier.start() called twice")
        for channel in self._channels:
            await channel.start()
        self._task = asyncio.create_task(self._run(), name="backhaul-notifier")

    # The drain deadline is part of the shutdown contract; callers may still cancel.
    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, deliver what is queued for up to ``timeout`` seconds, then stop.

        Whatever is still undelivered is counted as failed.
        """
        self._closed = True
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            self._task.cancel()
            await asyncio.wait([self._task])
        while not self._queue.empty():
            self._drop(self._queue.get_nowait(), "the notifier closed before delivery")
            self._queue.task_done()
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _run(self) -> None:
        while True:
            notification = await self._queue.get()
            try:
                await asyncio.gather(*(self._deliver(c, notification) for c in self._channels))
            finally:
                self._queue.task_done()

    async def _deliver(self, channel: Channel, notification: Notification) -> None:
        attempts = self._config.retries + 1
        problem = "delivery in progress"
        try:
            for attempt in range(attempts):
                if attempt:
                    delay = min(self._config.backoff * 2 ** (attempt - 1), _MAX_BACKOFF)
                    await asyncio.sleep(delay)
                try:
                    # asyncio.timeout: 3.11's wait_for can swallow a racing cancellation.
                    async with asyncio.timeout(self._config.timeout):
                        await channel.send(notification)
                except Exception as exc:
                    problem = _describe(exc, self._config.timeout)
                else:
                    e = notification.event
                    logger.info(
                        "%s notification for %s/%s sent via %s",
                        e.kind,
                        escape_control(e.agent),
                        escape_control(e.database),
                        channel.label,
                    )
                    self._call(self._on_sent, channel.name)
                    return
        except asyncio.CancelledError:
            self._report_failure(channel, notification, f"{problem}; cancelled at shutdown")
            raise
        self._report_failure(channel, notification, f"{problem} (after {attempts} attempt(s))")

    def _report_failure(self, channel: Channel, notification: Notification, problem: str) -> None:
        e = notification.event
        logger.warning(
            "%s notification for %s/%s via %s failed: %s",
            e.kind,
            escape_control(e.agent),
            escape_control(e.database),
            channel.label,
            problem,
        )
        self._call(self._on_failed, channel.name)

    def _drop(self, notification: Notification, why: str) -> None:
        for channel in self._channels:
            self._report_failure(channel, notification, f"not sent: {why}")

    def _call(self, callback: Callable[[str], None], channel_name: str) -> None:
        try:
            callback(channel_name)
        except Exception:
            logger.exception("notification %s callback raised", channel_name)
