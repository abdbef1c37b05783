"""Retrying a request to the collector with exponential backoff, within a fixed bound.

The agent runs from a timer: when the collector is briefly away (restarting, rebooting,
a network blip) it is better to wait a little than to lose the night's backup or the
report of a failure. The bound is ``[collector] retries`` further attempts after the
first, waiting ``retry_backoff`` seconds before the first retry and twice as long before
each next one (defaults: 3 retries, 5 s: waits of 5, 10 and 20 s, so about a minute
with the attempts themselves). If the collector stays away, the agent gives up and
logs it; the collector's missing-backup alert then covers the silence.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 5.0
MAX_DELAY = 300.0
"""No single wait is longer than this, whatever the configuration says."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; ``retries=0`` tries once."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not 0 <= self.retries <= 20:
            raise ValueError(f"retries must be 0-20, not {self.retries!r}")
        if not (math.isfinite(self.backoff) and 0 <= self.backoff <= MAX_DELAY):
            raise ValueError(f"retry backoff must be 0-{MAX_DELAY:g} s, not {self.backoff!r}")

    @classmethod
    def for_endpoint(cls, endpoint: object) -> RetryPolicy:
        """The policy of agent.toml's ``[collector]`` table (``retries``, ``retry_backoff``).

        Raises:
            ValueError: a value is out of range.
        """
        retries = getattr(endpoint, "retries", DEFAULT_RETRIES)
        backoff = getattr(endpoint, "retry_backoff", DEFAULT_BACKOFF)
        return cls(int(retries), float(backoff))

    @property
    def attempts(self) -> int:
        """Attempts in all, the first included."""
        return self.retries + 1

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return min(self.backoff * 2.0 ** max(retry - 1, 0), MAX_DELAY)

    @property
    def total_delay(self) -> float:
        """Seconds spent waiting when every attempt fails."""
        return sum(self.delay(n) for n in range(1, self.attempts))


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    retryable: Callable[[BaseException], bool],
    *,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """Await ``call()`` until it succeeds, ``policy`` is spent, or it fails for good.

    Each failure that will be retried is logged as a warning naming ``what``, the
    attempt and the wait. An exception for which ``retryable`` is false, or the last
    attempt's exception, propagates unchanged.

    Raises:
        Whatever ``call`` raises last.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == policy.attempts or not retryable(exc):
                raise
            delay = policy.delay(attempt)
            log.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                what,
                attempt,
                policy.attempts,
                exc,
                delay,
            )
            await sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
