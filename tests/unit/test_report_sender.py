"""The one REPORT sender: what it sends, and which lost reports it sends again."""

from __future__ import annotations

from typing import Any, cast

import pytest

from agent.link.connection import CollectorClient
from agent.link.requests import send_report
from agent.link.retry import RetryPolicy
from common.errors import (
    BackhaulError,
    CollectorTrustError,
    CollectorUnreachableError,
    RejectedError,
    TransportError,
)
from common.events import Ack, Event, Report


class FakeChannel:
    def __init__(self, sent: list[Event]) -> None:
        self.sent = sent
        self.closed = False

    async def send(self, event: Event) -> None:
        self.sent.append(event)

    async def expect(self, *kinds: type[Event], timeout: float | None = None) -> Event:
        assert Ack in kinds
        return Ack()

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """Fails to open a channel with each of ``failures`` in turn, then opens them."""

    def __init__(self, *failures: BackhaulError, retries: int = 3) -> None:
        self.retry_policy = RetryPolicy(retries=retries, backoff=0)
        self.failures = list(failures)
        self.sent: list[Event] = []
        self.channels: list[FakeChannel] = []
        self.reconnects = 0

    async def channel(self) -> FakeChannel:
        if self.failures:
            raise self.failures.pop(0)
        self.channels.append(FakeChannel(self.sent))
        return self.channels[-1]

    async def reconnect(self) -> None:
        self.reconnects += 1


async def report(client: FakeClient, **fields: Any) -> None:
    values: dict[str, Any] = {"kind": "failure", "reason": "dump", "message": "boom",
                              "database": "ward", "source": "main", **fields}
    await send_report(cast(CollectorClient, client), **values)


async def test_report_carries_the_failure_clipped_to_the_protocols_limits() -> None:
    client = FakeClient()
    await report(client, reason="r" * 100, message="m" * 5000)
    [sent] = client.sent
    assert isinstance(sent, Report)
    assert (sent.kind, sent.database, sent.source) == ("failure", "ward", "main")
    assert (len(sent.reason), len(sent.message)) == (64, 1000)
    assert sent.at.endswith("+00:00")
    assert client.channels[0].closed


@pytest.mark.parametrize(
    "lost",
    [CollectorUnreachableError("gone"), TransportError("no answer"),
     RejectedError("busy", "too many channels")],
    ids=["unreachable", "timeout", "busy"],
)
async def test_a_lost_report_is_sent_again_on_a_new_connection(lost: BackhaulError) -> None:
    client = FakeClient(lost)
    await report(client)
    assert (client.reconnects, len(client.sent)) == (1, 1)


@pytest.mark.parametrize(
    "refused",
    [CollectorTrustError("host key mismatch"), RejectedError("not_allowed", "no such database")],
    ids=["trust", "rejected"],
)
async def test_a_report_the_collector_will_not_have_is_not_sent_again(
    refused: BackhaulError,
) -> None:
    client = FakeClient(refused)
    with pytest.raises(type(refused)):
        await report(client)
    assert (client.reconnects, client.sent) == (0, [])


async def test_a_report_still_lost_after_every_retry_raises_the_last_error() -> None:
    client = FakeClient(*(CollectorUnreachableError(f"gone {n}") for n in range(3)), retries=2)
    with pytest.raises(CollectorUnreachableError, match="gone 2"):
        await report(client)
    assert client.reconnects == 2
