"""How a notification reaches the administrator: a webhook POST or a mail via SMTP.

Each channel's ``send`` either delivers one notification or raises; retries, timeouts
and counting belong to :mod:`collector.report.notify.delivery`.
"""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import socket
import ssl
from email.message import EmailMessage
from typing import TYPE_CHECKING, Protocol

from collector.report.notify.config import EmailConfig, NotifyConfig, WebhookConfig
from collector.report.notify.message import Notification

if TYPE_CHECKING:
    import aiohttp


class DeliveryError(Exception):
    """A channel could not deliver one notification (stays inside this package)."""


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
        # Imported here: a tenth of a second at every start of every collector command
        # (they all read the [notify] configuration), and only serve sends anything.
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "backhaul-collector"})

    async def send(self, notification: Notification) -> None:
        import aiohttp  # already loaded by start()

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
