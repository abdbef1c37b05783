"""The agent's retry policy and loop, with a recorded sleep instead of real waiting."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from agent.link.connection import is_transient
from agent.link.retry import DEFAULT_BACKOFF, DEFAULT_RETRIES, MAX_DELAY, RetryPolicy, retry
from common.errors import (
    CollectorTrustError,
    CollectorUnreachableError,
    RejectedError,
    TransportError,
)


class Flaky:
    """Fails with the given exceptions in turn, then returns ``"done"``."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def always(exc: BaseException) -> bool:
    return True


def test_delays_double_from_the_backoff() -> None:
    policy = RetryPolicy(retries=3, backoff=5)
    assert [policy.delay(n) for n in (1, 2, 3)] == [5, 10, 20]
    assert policy.attempts == 4
    assert policy.total_delay == 35


def test_defaults_give_up_within_about_a_minute() -> None:
    """Three retries over 35 s of waiting: a restart or reboot of the collector is covered."""
    policy = RetryPolicy()
    assert (policy.retries, policy.backoff) == (DEFAULT_RETRIES, DEFAULT_BACKOFF)
    assert 20 <= policy.total_delay <= 60


def test_no_single_wait_exceeds_the_cap() -> None:
    assert RetryPolicy(retries=20, backoff=100).delay(20) == MAX_DELAY


def test_zero_retries_tries_once() -> None:
    policy = RetryPolicy(retries=0)
    assert policy.attempts == 1
    assert policy.total_delay == 0


@pytest.mark.parametrize(
    ("retries", "backoff"), [(-1, 1.0), (21, 1.0), (3, -1.0), (3, float("nan")), (3, MAX_DELAY + 1)]
)
def test_out_of_range_values_are_refused(retries: int, backoff: float) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(retries=retries, backoff=backoff)


def test_policy_reads_the_collector_table_and_falls_back_to_defaults() -> None:
    assert RetryPolicy.for_endpoint(SimpleNamespace(retries=1, retry_backoff=0.5)) == RetryPolicy(
        1, 0.5
    )
    assert RetryPolicy.for_endpoint(SimpleNamespace()) == RetryPolicy()


async def test_transient_failures_are_retried_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call, sleeps = Flaky(OSError("refused"), OSError("refused")), Sleeps()
    with caplog.at_level(logging.WARNING, logger="agent.link.retry"):
        result = await retry(call, RetryPolicy(3, 2), "connecting to x", always, sleep=sleeps)
    assert result == "done"
    assert call.calls == 3
    assert sleeps.delays == [2, 4]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "connecting to x failed (attempt 1 of 4): refused; retrying in 2.0 s",
        "connecting to x failed (attempt 2 of 4): refused; retrying in 4.0 s",
    ]


async def test_last_failure_propagates_when_the_policy_is_spent() -> None:
    call, sleeps = Flaky(*(OSError(f"try {n}") for n in range(5))), Sleeps()
    with pytest.raises(OSError, match="try 2"):
        await retry(call, RetryPolicy(2, 1), "x", always, sleep=sleeps)
    assert call.calls == 3
    assert sleeps.delays == [1, 2]


async def test_permanent_failure_is_not_retried() -> None:
    call, sleeps = Flaky(PermissionError("key refused")), Sleeps()
    with pytest.raises(PermissionError):
        await retry(call, RetryPolicy(3, 1), "x", lambda e: False, sleep=sleeps)
    assert call.calls == 1
    assert sleeps.delays == []


def test_only_an_unreachable_or_busy_collector_is_worth_retrying() -> None:
    assert is_transient(CollectorUnreachableError("cannot reach collector"))
    assert is_transient(RejectedError("busy", "too many connections from this agent"))
    assert not is_transient(CollectorTrustError("host key does not match the pinned one"))
    assert not is_transient(TransportError("cannot read the agent key"))
    assert not is_transient(RejectedError("storage", "disk full"))
    assert not is_transient(OSError("refused"))
