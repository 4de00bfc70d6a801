"""A long database outage: 2,000 consecutive failures of the reply consumer's and the
timer loop's transactions. Neither loop dies (an uncapped ``0.1 * 2**n`` would raise
OverflowError after 1,024), each waits at most its cap between tries, and both go on
working as soon as the database answers again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
import psycopg
import pytest
from google.protobuf import duration_pb2

from coordinator.api import validation
from coordinator.engine import Event, SagaState
from coordinator.errors import StorageUnavailable
from coordinator.messaging.codec import encode_command
from coordinator.messaging.replies import ReplyConsumer
from coordinator.store.pool import open_pool
from coordinator.store.repository import Applied, SagaStore
from coordinator.timers import TimerLoop
from sagaplane import backoff
from sagaplane.consuming import DeadLetters
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import messages_pb2

OUTAGE = 2000
CAP = 0.002
"""The loops' max_backoff here: 2,000 waits of at most 2 ms."""


class Outage:
    """The store, failing as an unreachable database does for its first ``OUTAGE`` calls."""

    def __init__(self, store: SagaStore) -> None:
        self.store = store
        self.failures = 0
        self.calls: list[float] = []

    def _fail(self) -> None:
        self.calls.append(time.monotonic())
        if self.failures < OUTAGE:
            self.failures += 1
            raise StorageUnavailable()

    async def apply_many(self, events: Sequence[tuple[str, Event]]) -> list[Applied]:
        self._fail()
        return await self.store.apply_many(events)

    async def fire_due_timers(self, limit: int) -> list[Applied]:
        self._fail()
        return await self.store.fire_due_timers(limit)

    def longest_wait(self) -> float:
        return max(b - a for a, b in zip(self.calls, self.calls[1:], strict=False))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SagaStore]:
    pool = await open_pool(database_url, size=2)
    async with pool:
        yield SagaStore(pool, encode_command)


async def _start(store: SagaStore, **fields: Any) -> tuple[str, str]:
    request = api.StartSagaRequest(
        name="order", steps=[api.StepSpec(name="create", action="orders.create")], **fields
    )
    started = await store.start(
        validation.start_request(request), request=validation.canonical(request)
    )
    return started.saga.id, started.saga.steps[0].id


async def _wait(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "did not recover"
        await asyncio.sleep(0.02)


def test_the_backoff_is_capped_whatever_the_count() -> None:
    for failures in (0, 1, 10, 1024, 2000, 10**9):
        assert 0 < backoff.delay(failures, maximum=5.0) <= 5.0
    assert backoff.delay(3, initial=0.1, maximum=5.0, jitter=False) == pytest.approx(0.8)


async def test_the_timer_loop_outlives_2000_database_failures(store: SagaStore) -> None:
    saga_id, _ = await _start(store, step_timeout=duration_pb2.Duration(nanos=50_000_000))
    outage = Outage(store)
    timers = TimerLoop(outage, interval=0.01, max_backoff=CAP)  # type: ignore[arg-type]
    await timers.start()
    try:

        async def timed_out() -> bool:
            assert timers.task is not None and not timers.task.done(), "the timer loop died"
            saga, _ = await store.get(saga_id)
            return saga.steps[0].attempts == 2  # attempt 1 timed out, attempt 2 dispatched

        await _wait(timed_out)
    finally:
        await timers.stop()
    assert outage.failures == OUTAGE
    assert outage.longest_wait() < 1.0, "a wait grew past its cap"


async def test_the_reply_consumer_outlives_2000_database_failures(
    store: SagaStore, amqp_url: str, database_url: str
) -> None:
    saga_id, step_id = await _start(store)
    # The command's token is kept from every API: read it where the coordinator keeps it.
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute("SELECT token FROM sagaplane_steps WHERE id = %s", (step_id,))
        row = await cur.fetchone()
    assert row is not None
    reply = messages_pb2.StepReply(
        saga_id=saga_id,
        step_id=step_id,
        attempt=1,
        kind=messages_pb2.COMMAND_KIND_EXECUTE,
        outcome=messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        token=row[0],
    )
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("outage-replies", durable=True)
        outage = Outage(store)
        consumer = ReplyConsumer(
            outage,  # type: ignore[arg-type]
            queue,
            DeadLetters(connection, queue="outage-replies"),
            max_backoff=CAP,
        )
        await consumer.start()
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(reply.SerializeToString(), message_id="r-1"), "outage-replies"
            )

            async def applied() -> bool:
                assert consumer.task is not None and not consumer.task.done(), "it died"
                saga, _ = await store.get(saga_id)
                return saga.state is SagaState.COMPLETED

            await _wait(applied)
        finally:
            await consumer.stop()
    assert outage.failures == OUTAGE
    assert outage.longest_wait() < 1.0, "a wait grew past its cap"
