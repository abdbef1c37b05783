"""The ``[notify]`` table of collector.toml, read strictly into frozen dataclasses.

Configuration::

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
    password_file = "smtp-password"   # relative to the configuration file; 0600, one line
    cafile = "relay-ca.pem"  # optional: trust this CA instead of the system store

Like every table, it is read through :class:`common.config.Table`: an unknown key or a
bad value stops start-up with the file and the dotted key named.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from common.config import Table
from common.credentials import read_secret_file
from common.errors import ConfigError
from common.text import escape_control

MAX_BACKOFF = 300.0  # seconds; also caps the doubling retry delay


def _plain(table: Table, key: str, value: str, *, spaces: bool = False) -> str:
    """``value`` if it is non-empty and holds no control, invisible or (unless allowed) space."""
    if not value:
        raise ConfigError(f"{table.where(key)} must not be empty")
    if escape_control(value, backslash=False) != value or (" " in value and not spaces):
        raise ConfigError(
            f"{table.where(key)} must not contain spaces or control characters: {value!r}"
        )
    return value


def _address(table: Table, key: str, value: str) -> str:
    text = _plain(table, key, value)
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or len(text) > 254 or "<" in text or ">" in text:
        raise ConfigError(
            f"{table.where(key)}: expected a plain e-mail address like admin@example.org: {text!r}"
        )
    return text


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
    def parse(cls, url: str, where: str) -> WebhookConfig:
        """Validate an ``http(s)://host[:port]/path`` URL; raises ConfigError naming ``where``."""
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 -- property that raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(f"{where}: bad port in webhook URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: expected an http:// or https:// URL with a host name")
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

    @classmethod
    def from_table(cls, table: Table) -> EmailConfig:
        """Build from the ``[notify.email]`` table; raises ConfigError naming file and key."""
        host = _plain(table, "host", table.text("host"))
        starttls = table.flag("starttls", True)
        port = table.integer("port", 587 if starttls else 25, low=1, high=65535)
        recipients = table.str_list("recipients")
        if not recipients:
            raise ConfigError(f"{table.where('recipients')} must list at least one address")
        recipients = tuple(_address(table, "recipients", r) for r in recipients)
        sender = _address(table, "sender", table.text("sender"))
        username = table.text("username", None)
        if username is not None:
            username = _plain(table, "username", username)
        password_file = table.path("password_file", None)
        cafile = table.path("cafile", None)
        table.done()
        password = _auth(table, host, starttls, username, password_file)
        if cafile is not None:
            _check_cafile(table, cafile)
        return cls(
            host, port, sender, recipients, starttls, username, password, password_file, cafile
        )


def _auth(
    table: Table, host: str, starttls: bool, username: str | None, password_file: Path | None
) -> str | None:
    """The SMTP password, if AUTH is configured and safe to use as configured."""
    password = None
    if password_file is not None:
        password = read_secret_file(password_file, table.where("password_file"))
    if (username is None) != (password is None):
        raise ConfigError(f"{table.where('username')}: username and password_file go together")
    if username is not None and not starttls and not _is_loopback(host):
        raise ConfigError(
            f"{table.where('starttls')}: AUTH without STARTTLS would send the password in clear"
        )
    return password


def _check_cafile(table: Table, cafile: Path) -> None:
    try:
        ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{table.where('cafile')}: cannot load {cafile}: {exc}") from None


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


def parse_notify_config(table: Table) -> NotifyConfig:
    """Validate the ``[notify]`` table (``top.table("notify")`` of collector.toml).

    Raises:
        ConfigError: naming the file and the dotted key, for an unknown key, a wrong type,
            an out-of-range value, or an unreadable password or CA file.
    """
    hooks = table.str_list("webhooks", ())
    where = table.where("webhooks")
    hooks = tuple(WebhookConfig.parse(_plain(table, "webhooks", u), where).url for u in hooks)
    if len(set(hooks)) != len(hooks):
        raise ConfigError(f"{where}: the same URL is listed twice")
    email_table = table.table("email") if table.has("email") else None
    timeout = table.number("timeout", 10.0, high=300)
    if timeout <= 0:
        raise ConfigError(f"{table.where('timeout')} must be more than 0")
    min_interval = table.number("min_interval", 3600.0)
    retries = table.integer("retries", 3, high=10)
    backoff = table.number("backoff", 1.0, high=MAX_BACKOFF)
    queue_size = table.integer("queue_size", 100, low=1, high=10_000)
    table.done()  # a misspelt key is named before any file the e-mail table points at is read
    return NotifyConfig(
        webhooks=hooks,
        email=None if email_table is None else EmailConfig.from_table(email_table),
        min_interval=min_interval,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        queue_size=queue_size,
    )
