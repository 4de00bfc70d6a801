"""Domain events against the real PostgreSQL and RabbitMQ: emitted in the business
transaction, relayed to ``sagaplane.events`` by type, consumed once per (source, id).

Each module gets a fresh database (shared by the emitting and the consuming services, as
their inboxes are keyed by consumer) and a fresh vhost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest
from aio_pika.abc import AbstractQueue
from psycopg_pool import AsyncConnectionPool

from helpers.broker import fresh_vhost, rabbitmqctl
from helpers.participants import (
    FAILED,
    SUCCEEDED,
    WAIT,
    Broker,
    ParticipantFactory,
    broker,
    db,
    make_participant,
    participant_database,
    uid,
)
from sagaplane import (
    EventContext,
    InvalidEvent,
    NonRetryableError,
    StepContext,
    events,
    topology,
    wire,
)
from sagaplane.relay import OutboxRelay
from sagaplane.testing import Child

__all__ = ["broker", "db", "make_participant"]  # fixtures, imported for pytest

ROOT = Path(__file__).resolve().parents[2]

TABLES = """
CREATE TABLE handled (consumer text, event_id text, type text, data jsonb, attempt int);
CREATE TABLE emitter_orders (id text PRIMARY KEY);
"""


@pytest.fixture(scope="module")
async def database_url() -> AsyncIterator[str]:
    async with participant_database("sagaplane_events", TABLES) as url:
        yield url


@pytest.fixture(scope="module")
def participant_url(database_url: str) -> str:
    return database_url


@pytest.fixture(scope="module")
async def amqp_url() -> AsyncIterator[str]:
    async with fresh_vhost() as url:
        yield url


# -- helpers ------------------------------------------------------------------------------


async def spy(broker: Broker, pattern: str) -> AbstractQueue:
    """A private queue bound to the events exchange with ``pattern``."""
    await topology.declare_core(broker.channel)
    queue = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
    exchange = await broker.channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
    await queue.bind(exchange, routing_key=pattern)
    return queue


async def take(queue: AbstractQueue, count: int, *, settle: float = 0.5) -> list[Any]:
    """At least ``count`` messages (failing after WAIT), then whatever else comes within
    ``settle`` seconds."""
    got = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                got.append(message)
    await asyncio.sleep(settle)
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


def recorder(consumer: str) -> Any:
    """An event handler that records each run in ``handled``."""

    async def record(ctx: EventContext) -> None:
        await ctx.tx.execute(
            "INSERT INTO handled (consumer, event_id, type, data, attempt)"
            " VALUES (%s, %s, %s, %s, %s)",
            (consumer, ctx.event.id, ctx.event.type, json.dumps(ctx.event.data), ctx.attempt),
        )

    return record


async def handled(db: psycopg.AsyncConnection[Any], consumer: str) -> list[tuple[str, str]]:
    cur = await db.execute(
        "SELECT event_id, type FROM handled WHERE consumer = %s ORDER BY event_id", (consumer,)
    )
    return [(row[0], row[1]) for row in await cur.fetchall()]


async def wait_handled(
    db: psycopg.AsyncConnection[Any], consumer: str, count: int, *, within: float = WAIT
) -> list[tuple[str, str]]:
    async with asyncio.timeout(within):
        while True:
            rows = await handled(db, consumer)
            if len(rows) >= count:
                return rows
            await asyncio.sleep(0.05)


async def publish_event(
    broker: Broker,
    body: bytes,
    *,
    routing_key: str,
    message_id: str,
    content_type: str = topology.EVENT_CONTENT_TYPE,
) -> None:
    """Publish a body to the events exchange the way the relay does."""
    exchange = await broker.channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body,
            message_id=message_id,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=routing_key,
    )


def event(type: str, n: int, source: str = "test") -> wire.Event:
    return wire.Event(type=type, source=source, id=f"e-{n:03d}", time=None, data={"n": n})


async def queue_messages(amqp_url: str, queue: str) -> int:
    """Messages in ``queue``, ready and unacknowledged (as the broker counts them)."""
    vhost = amqp_url.rsplit("/", 1)[1]
    out = await rabbitmqctl(
        "list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages"
    )
    for line in out.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    return 0


async def drained(amqp_url: str, queue: str) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if await queue_messages(amqp_url, queue) == 0:
                return
            await asyncio.sleep(0.2)


# -- emitting --------------------------------------------------------------------------


async def test_a_handler_that_emits_and_then_raises_publishes_nothing(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    kind = f"order.{uid()}"
    listener = await spy(broker, f"{kind}.*")
    participant = make_participant()

    @participant.step(f"{kind}.create")
    async def create(ctx: StepContext) -> dict[str, Any]:
        await ctx.emit(f"{kind}.created", {"step": ctx.step_id}, subject=ctx.step_id)
        if ctx.input.get("fail"):
            raise NonRetryableError("out of stock")
        return {}

    await participant.start()
    await broker.send(action=f"{kind}.create", saga_id="s1", step_id="fails", input={"fail": 1})
    assert (await broker.reply()).outcome == FAILED
    await broker.send(action=f"{kind}.create", saga_id="s2", step_id="works")
    assert (await broker.reply()).outcome == SUCCEEDED

    received = await take(listener, 1)
    assert [json.loads(m.body)["data"] for m in received] == [{"step": "works"}]
    [message] = received
    assert message.content_type == "application/cloudevents+json"
    assert message.routing_key == f"{kind}.created"
    body = json.loads(message.body)
    assert body["specversion"] == "1.0"
    assert body["type"] == f"{kind}.created"
    assert body["source"] == participant.service
    assert body["subject"] == "works"
    assert message.message_id == body["id"] and len(body["id"]) == 26  # a ULID
    assert "time" in body
    cur = await db.execute(
        "SELECT count(*) FROM sagaplane_outbox WHERE routing_key = %s", (f"{kind}.created",)
    )
    assert await cur.fetchone() == (1,)


async def test_emit_in_a_rolled_back_transaction_publishes_nothing(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    participant_url: str,
) -> None:
    kind = f"signup.{uid()}"
    consumer = make_participant()
    consumer.on_event(f"{kind}.*")(recorder(consumer.service))
    await consumer.start()

    # A web request's own transactions: one rolled back, one committed.
    async with await psycopg.AsyncConnection.connect(participant_url) as conn:
        await events.emit(conn, f"{kind}.created", {"user": "ann"}, source="web", id="rolled")
        await conn.rollback()
        async with conn.transaction():
            await events.emit(conn, f"{kind}.created", {"user": "bob"}, source="web", id="kept")

    assert await wait_handled(db, consumer.service, 1) == [("kept", f"{kind}.created")]
    await asyncio.sleep(0.5)
    assert await handled(db, consumer.service) == [("kept", f"{kind}.created")]


async def test_an_event_nobody_listens_to_is_published_not_parked(
    participant_url: str, amqp_url: str, broker: Broker
) -> None:
    await topology.declare_core(broker.channel)
    async with await psycopg.AsyncConnection.connect(participant_url) as conn:
        sent = await events.emit(conn, f"nobody.{uid()}", {"x": 1}, source="web")
        await conn.commit()
    async with AsyncConnectionPool(participant_url, open=False) as pool:
        relay = OutboxRelay(pool, amqp_url, connection_name="test:nobody")
        try:
            while await relay.relay_once():
                pass
        finally:
            await relay.stop()
    async with await psycopg.AsyncConnection.connect(participant_url) as conn:
        cur = await conn.execute(
            "SELECT sent_at IS NOT NULL, attempts, parked_at FROM sagaplane_outbox"
            " WHERE message_id = %s",
            (sent.id,),
        )
        assert await cur.fetchone() == (True, 0, None)


async def test_emit_refuses_what_cannot_be_sent(participant_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(participant_url) as conn:
        with pytest.raises(InvalidEvent, match="type"):
            await events.emit(conn, "", {}, source="web")
        with pytest.raises(InvalidEvent, match="JSON object"):
            await events.emit(conn, "a.b", [1, 2], source="web")  # type: ignore[arg-type]
        with pytest.raises(InvalidEvent, match="not JSON"):
            await events.emit(conn, "a.b", {"when": object()}, source="web")
        with pytest.raises(InvalidEvent, match="Bad-Name"):
            await events.emit(conn, "a.b", {}, source="web", extensions={"Bad-Name": "x"})
        with pytest.raises(InvalidEvent, match="at most"):
            await events.emit(conn, "a.b", {"blob": "x" * 300_000}, source="web")
        await conn.rollback()


# -- consuming -------------------------------------------------------------------------


async def test_every_event_twice_and_out_of_order_runs_each_handler_once(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    amqp_url: str,
) -> None:
    kind = f"stock.{uid()}"
    consumer = make_participant(prefetch=8)
    consumer.on_event(f"{kind}.#")(recorder(consumer.service))
    await consumer.start()

    sent = [event(f"{kind}.moved.in", n) for n in range(20)]
    copies = random.sample(sent, len(sent)) + random.sample(sent, len(sent))
    for e in copies:
        await publish_event(broker, wire.encode_event(e), routing_key=e.type, message_id=e.id)

    rows = await wait_handled(db, consumer.service, len(sent))
    await drained(amqp_url, topology.events_queue(consumer.service))
    assert sorted(rows) == sorted((e.id, e.type) for e in sent)
    assert await handled(db, consumer.service) == rows  # every copy settled: none ran twice
    cur = await db.execute(
        "SELECT count(*) FROM sagaplane_event_inbox WHERE consumer = %s", (consumer.service,)
    )
    assert await cur.fetchone() == (len(sent),)


async def test_two_services_each_handle_an_event_once(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    kind = f"invoice.{uid()}"
    first, second = make_participant(), make_participant()
    for consumer in (first, second):
        consumer.on_event(f"{kind}.*")(recorder(consumer.service))
        await consumer.start()
    e = event(f"{kind}.paid", 1)
    await publish_event(broker, wire.encode_event(e), routing_key=e.type, message_id=e.id)
    assert await wait_handled(db, first.service, 1) == [(e.id, e.type)]
    assert await wait_handled(db, second.service, 1) == [(e.id, e.type)]


async def test_a_failing_handler_is_retried_and_its_writes_roll_back(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    kind = f"mail.{uid()}"
    consumer = make_participant(event_retry_initial=0.01)
    record = recorder(consumer.service)

    @consumer.on_event(f"{kind}.*")
    async def flaky(ctx: EventContext) -> None:
        await record(ctx)
        if ctx.attempt < 3:
            raise ConnectionError("the mail server is away")

    await consumer.start()
    e = event(f"{kind}.queued", 1)
    await publish_event(broker, wire.encode_event(e), routing_key=e.type, message_id=e.id)
    await wait_handled(db, consumer.service, 1)
    cur = await db.execute("SELECT attempt FROM handled WHERE consumer = %s", (consumer.service,))
    assert await cur.fetchall() == [(3,)]


async def test_poison_events_are_dead_lettered_with_their_reason_and_block_nothing(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    kind = f"poison.{uid()}"
    consumer = make_participant(event_max_attempts=3, event_retry_initial=0.01)
    record = recorder(consumer.service)

    @consumer.on_event(f"{kind}.*")
    async def handle(ctx: EventContext) -> None:
        if ctx.event.type.endswith(".bad"):
            raise ValueError("this event always fails")
        await record(ctx)

    await consumer.start()
    await publish_event(broker, b"{not json", routing_key=f"{kind}.x", message_id="garbage")
    await publish_event(
        broker,
        b'{"hello": "world"}',
        routing_key=f"{kind}.x",
        message_id="plain-json",
        content_type="application/json",
    )
    await publish_event(broker, b'{"type": "x"}', routing_key=f"{kind}.x", message_id="no-id")
    bad = event(f"{kind}.bad", 1)
    await publish_event(broker, wire.encode_event(bad), routing_key=bad.type, message_id=bad.id)
    good = event(f"{kind}.good", 2)
    await publish_event(broker, wire.encode_event(good), routing_key=good.type, message_id=good.id)

    assert await wait_handled(db, consumer.service, 1) == [(good.id, good.type)]
    assert "not JSON" in await broker.dead_letter_reason("garbage")
    assert "not a CloudEvent" in await broker.dead_letter_reason("plain-json")
    assert "no specversion" in await broker.dead_letter_reason("no-id")
    reason = await broker.dead_letter_reason(bad.id)
    assert "failed 3 times" in reason and "ValueError: this event always fails" in reason
    assert consumer.dead_lettered == {"event_undecodable": 3, "event_failed": 1}


async def test_patterns_no_longer_registered_are_unbound_at_start(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    kind = f"ship.{uid()}"
    before = make_participant()
    before.on_event(f"{kind}.old")(recorder(before.service))
    before.on_event(f"{kind}.kept")(recorder(before.service))
    await before.start()
    await before.stop()

    after = make_participant()
    after.service = before.service  # the same service, redeployed without one handler
    after.on_event(f"{kind}.kept")(recorder(after.service))
    await after.start()
    for n, routed in enumerate(("old", "kept")):
        e = event(f"{kind}.{routed}", n)
        await publish_event(broker, wire.encode_event(e), routing_key=e.type, message_id=e.id)
    assert await wait_handled(db, after.service, 1) == [("e-001", f"{kind}.kept")]
    await asyncio.sleep(0.5)
    assert await handled(db, after.service) == [("e-001", f"{kind}.kept")]


# -- a crash between the commit and the publish ------------------------------------------


async def _until_output(child: Child, text: str, mark: int = 0) -> None:
    """Until ``child`` printed ``text`` (after :meth:`Child.output_mark` gave ``mark``)."""
    async with asyncio.timeout(120):
        while not any(text in line for line in child.output_since(mark)):
            child.check_alive()
            await asyncio.sleep(0.05)


@pytest.fixture
async def emitter_db() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The emitting service's own database (its relay must not be the consumer's)."""
    async with (
        participant_database("sagaplane_emitter", "SELECT 1") as url,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
    ):
        yield conn


async def test_sigkill_after_commit_before_publish_is_published_after_restart_once(
    make_participant: ParticipantFactory,
    db: psycopg.AsyncConnection[Any],
    emitter_db: psycopg.AsyncConnection[Any],
    amqp_url: str,
) -> None:
    kind = f"order.{uid()}"
    consumer = make_participant()
    consumer.on_event(f"{kind}.created")(recorder(consumer.service))
    await consumer.start()
    env = {
        **_child_env(),
        "SAGAPLANE_DATABASE_URL": emitter_db.info.dsn,
        "SAGAPLANE_AMQP_URL": amqp_url,
    }
    event_id = f"order-{uid()}"
    web = Child(
        "emitter",
        [sys.executable, "-m", "helpers.event_emitter", "emit", f"{kind}.created", event_id],
        env=env,
        cwd=ROOT,
        tail_lines=500,
    )
    await web.start()
    await _until_output(web, f"committed {event_id}")
    await web.kill()

    # Committed, never published: the row waits in the outbox.
    cur = await emitter_db.execute(
        "SELECT sent_at FROM sagaplane_outbox WHERE message_id = %s", (event_id,)
    )
    assert await cur.fetchall() == [(None,)]
    await asyncio.sleep(0.3)
    assert await handled(db, consumer.service) == []

    service = Child(
        "emitter",
        [sys.executable, "-m", "helpers.event_emitter", "serve"],
        env=env,
        cwd=ROOT,
        tail_lines=500,
    )
    try:
        await service.start()
        # A process of its own to start (imports, migrations, connections): on a busy
        # machine that takes a while.
        await _until_output(service, "serving")
        assert await wait_handled(db, consumer.service, 1) == [(event_id, f"{kind}.created")]

        # The relay's "sent" is committed without waiting for its WAL flush: a crash may
        # lose it, and the event is published again. The consumer's inbox absorbs it.
        await service.kill()
        await emitter_db.execute(
            "UPDATE sagaplane_outbox SET sent_at = NULL WHERE message_id = %s", (event_id,)
        )
        mark = service.output_mark()
        await service.start()
        await _until_output(service, "serving", mark)
        async with asyncio.timeout(WAIT):
            while True:
                cur = await emitter_db.execute(
                    "SELECT sent_at FROM sagaplane_outbox WHERE message_id = %s", (event_id,)
                )
                if (await cur.fetchone()) != (None,):
                    break
                await asyncio.sleep(0.05)
        await drained(amqp_url, topology.events_queue(consumer.service))
        assert await handled(db, consumer.service) == [(event_id, f"{kind}.created")]
    finally:
        await service.stop()


def _child_env() -> dict[str, str]:
    parts = [str(ROOT), str(ROOT / "clients" / "python"), str(ROOT / "tests")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


# -- the dead-letter queue, for people ------------------------------------------------------


async def _sagaplane(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", *argv, cwd=ROOT, env=_child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_dlq_list_says_what_died_and_why_and_replay_of_a_fixed_event_runs_it_once(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    amqp_url: str,
) -> None:
    kind = f"refund.{uid()}"
    consumer = make_participant(event_max_attempts=2, event_retry_initial=0.01)
    record = recorder(consumer.service)
    fixed = False

    @consumer.on_event(f"{kind}.*")
    async def handle(ctx: EventContext) -> None:
        if not fixed:
            raise RuntimeError("the refunds API is misconfigured")
        await record(ctx)

    await consumer.start()
    e = event(f"{kind}.asked", 1, source=f"shop-{uid()}")
    await publish_event(broker, wire.encode_event(e), routing_key=e.type, message_id=e.id)
    async with asyncio.timeout(WAIT):
        while True:
            if consumer.dead_lettered.get("event_failed", 0) >= 1:
                break
            await asyncio.sleep(0.05)
    # Acked only once the dead-letter queue confirmed its copy.
    await drained(amqp_url, topology.events_queue(consumer.service))

    status, out, err = await _sagaplane("dlq", "list", "--amqp-url", amqp_url, "--json")
    assert status == 0, err
    dead = [json.loads(line) for line in out.splitlines()]
    [mine] = [d for d in dead if d["message_id"] == e.id]
    assert mine["kind"] == "event"
    assert mine["queue"] == topology.events_queue(consumer.service)
    assert mine["routing_key"] == e.type
    assert "failed 2 times" in mine["reason"] and "misconfigured" in mine["reason"]

    # Listing gives every message back (nothing is lost), and shows what a listing costs.
    counts = [mine["delivery_count"] or 0]
    for _ in range(2):
        status, out, err = await _sagaplane("dlq", "list", "--amqp-url", amqp_url)
        assert status == 0, err
        assert "DELIVERY COUNT" in out and e.id in out
        status, out, err = await _sagaplane("dlq", "list", "--amqp-url", amqp_url, "--json")
        [again] = [d for d in map(json.loads, out.splitlines()) if d["message_id"] == e.id]
        counts.append(again["delivery_count"] or 0)
    async with await aio_pika.connect(amqp_url) as connection:
        version = await topology.broker_version(await connection.channel())
    if version is not None and version < (4, 3):
        # Each listing's return counts as a delivery (two listings per round above).
        assert counts == [counts[0], counts[0] + 2, counts[0] + 4], counts
    else:
        assert counts == [counts[0]] * 3, counts  # basic.nack no longer counts

    fixed = True
    status, out, err = await _sagaplane("dlq", "replay", e.id, "--amqp-url", amqp_url)
    assert status == 0, err
    assert f"message {e.id} (event): replayed to {topology.events_queue(consumer.service)}" in out
    assert await wait_handled(db, consumer.service, 1) == [(e.id, e.type)]
    # Gone from the dead-letter queue: a second replay finds nothing.
    status, out, _ = await _sagaplane("dlq", "replay", e.id, "--amqp-url", amqp_url)
    assert status == 4 and "not in sagaplane.dead-letter" in out
    await drained(amqp_url, topology.events_queue(consumer.service))
    assert await handled(db, consumer.service) == [(e.id, e.type)]
