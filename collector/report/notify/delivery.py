"""Delivery of notifications in the background, with retries, so no backup waits on them.

The collector calls :meth:`Notifier.notify` for every backup outcome it wants the
administrator to hear about. ``notify`` never blocks and never raises: the policy
decides what is worth sending, and a background task delivers through each configured
channel with retries, so a slow or broken mail server can never fail or delay a backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from collector.report.notify.channels import Channel, DeliveryError, channels_from_config
from collector.report.notify.config import MAX_BACKOFF, NotifyConfig
from collector.report.notify.message import Event, Notification
from collector.report.notify.policy import NotifyPolicy
from common.text import escape_control

# The package's name, as when it was one module: log lines keep their logger name.
logger = logging.getLogger(__package__)


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
                    delay = min(self._config.backoff * 2 ** (attempt - 1), MAX_BACKOFF)
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
