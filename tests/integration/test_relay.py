"""The outbox relay and the topology against the real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import psycopg
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from psycopg_pool import AsyncConnectionPool
from relay_fixtures import (
    amqp,
    amqp_url,
    amqp_vhost,
    channel,
    clean_outbox,
    close_amqp_connection,
    drain,
    enqueue_committed,
    list_queues,
    make_relay,
    message,
    outbox_database,
    outbox_pool,
    outbox_rows,
    sink,
    terminate_backends,
    wait_for_listener,
)

from helpers.database import unique_name
from sagaplane import topology
from sagaplane.outbox import enqueue
from sagaplane.relay import OutboxRelay

# Fixtures live in relay_fixtures; importing them is what makes pytest see them here.
__fixtures__ = (
    amqp,
    amqp_url,
    amqp_vhost,
    channel,
    clean_outbox,
    make_relay,
    outbox_database,
    outbox_pool,
)

pytestmark = pytest.mark.usefixtures("clean_outbox")

MakeRelay = Callable[..., OutboxRelay]


async def test_committed_rows_are_published_once_and_marked_sent(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    messages = [message(exchange, routing_key=f"step.{i}") for i in range(3)]
    await enqueue_committed(outbox_database, messages)
    relay = make_relay()

    assert await relay.relay_once() == 3
    assert await relay.relay_once() == 0

    received = await drain(queue, 3)
    assert [m.message_id for m in received] == [m.message_id for m in messages]
    for sent, got in zip(messages, received, strict=True):
        assert got.body == sent.body
        assert got.routing_key == sent.routing_key
        assert got.type == sent.message_type
        assert got.correlation_id == sent.correlation_id
        assert got.content_type == topology.CONTENT_TYPE
        assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    rows = await outbox_rows(outbox_database)
    for m in messages:
        row = rows[m.message_id]
        assert row["sent_at"] is not None
        assert row["attempts"] == 0
        assert row["parked_at"] is None


async def test_a_row_committed_after_a_later_row_is_not_lost(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    first, second = message(exchange), message(exchange)
    relay = make_relay()

    async with await psycopg.AsyncConnection.connect(outbox_database) as tx_a:
        await enqueue(tx_a, [first])  # takes the lower id, commits last
        async with await psycopg.AsyncConnection.connect(outbox_database) as tx_b:
            await enqueue(tx_b, [second])
            await tx_b.commit()
        assert await relay.relay_once() == 1
        await tx_a.commit()
    assert await relay.relay_once() == 1

    rows = await outbox_rows(outbox_database)
    assert rows[first.message_id]["id"] < rows[second.message_id]["id"]
    assert all(row["sent_at"] is not None for row in rows.values())
    received = await drain(queue, 2)
    assert [m.message_id for m in received] == [second.message_id, first.message_id]


async def test_an_unroutable_row_is_retried_then_parked(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel, routing_keys=["good"])
    good, bad = message(exchange, routing_key="good"), message(exchange, routing_key="nowhere")
    await enqueue_committed(outbox_database, [bad, good])
    relay = make_relay(max_attempts=3, retry_initial=0.0)

    assert await relay.relay_once() == 1
    row = (await outbox_rows(outbox_database))[bad.message_id]
    assert (row["sent_at"], row["attempts"], row["parked_at"]) == (None, 1, None)
    assert "NO_ROUTE" in row["last_error"]

    assert await relay.relay_once() == 0
    assert await relay.relay_once() == 0
    row = (await outbox_rows(outbox_database))[bad.message_id]
    assert row["sent_at"] is None
    assert row["attempts"] == 3
    assert row["parked_at"] is not None

    # Parked rows are not claimed any more.
    assert await relay.relay_once() == 0
    assert (await outbox_rows(outbox_database))[bad.message_id]["attempts"] == 3
    assert [m.message_id for m in await drain(queue, 1)] == [good.message_id]


async def test_a_missing_exchange_charges_only_its_own_row(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    # The broker closes the channel on a missing exchange, failing every publish in
    # flight: the innocent rows must still go out, and not be charged an attempt.
    exchange, queue = await sink(channel)
    goods = [message(exchange) for _ in range(20)]
    bad = message("sagaplane.test.no-such-exchange")
    await enqueue_committed(outbox_database, [*goods[:10], bad, *goods[10:]])
    relay = make_relay()

    assert await relay.relay_once() == 20
    rows = await outbox_rows(outbox_database)
    assert all(rows[g.message_id]["sent_at"] is not None for g in goods)
    assert all(rows[g.message_id]["attempts"] == 0 for g in goods)
    assert rows[bad.message_id]["attempts"] == 1
    assert "NOT_FOUND" in rows[bad.message_id]["last_error"]
    # At least once: a publish whose confirm the closing channel swallowed is repeated.
    received = Counter(m.message_id for m in await drain(queue, 20))
    assert set(received) == {g.message_id for g in goods}

    # The relay's channel recovered.
    later = message(exchange)
    await enqueue_committed(outbox_database, [later])
    assert await relay.relay_once() == 1


async def test_a_channel_closed_mid_batch_charges_only_the_guilty_row(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    # An exchange deleted after the relay checked it: the publish closes the channel
    # (and aiormq may take the connection down with it) under the whole batch.
    exchange, queue = await sink(channel)
    doomed = await channel.declare_exchange(unique_name("doomed"), aio_pika.ExchangeType.FANOUT)
    doomed_queue = await channel.declare_queue(unique_name("doomed"), exclusive=True)
    await doomed_queue.bind(doomed)
    relay = make_relay()
    await enqueue_committed(outbox_database, [message(exchange), message(doomed.name)])
    assert await relay.relay_once() == 2
    await drain(queue, 1, settle=0)
    await doomed.delete()

    goods = [message(exchange) for _ in range(40)]
    bad = message(doomed.name)
    await enqueue_committed(outbox_database, [*goods[:20], bad, *goods[20:]])
    transport_errors = 0
    for _ in range(5):
        try:
            await relay.relay_once()
        except (ConnectionError, aiormq.exceptions.AMQPError):
            transport_errors += 1
        rows = await outbox_rows(outbox_database)
        if all(rows[g.message_id]["sent_at"] is not None for g in goods):
            break
    assert transport_errors <= 1
    assert all(rows[g.message_id]["sent_at"] is not None for g in goods)
    assert all(rows[g.message_id]["attempts"] == 0 for g in goods)
    assert rows[bad.message_id]["sent_at"] is None
    assert rows[bad.message_id]["attempts"] >= 1
    assert "NOT_FOUND" in rows[bad.message_id]["last_error"]
    received = Counter(m.message_id for m in await drain(queue, 40))
    assert set(received) == {g.message_id for g in goods}


async def test_repeated_message_ids_in_one_batch_are_each_published(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    # aiormq pairs a basic.return with its publish by message_id; duplicates in one
    # batch must not let a returned message pass for its twin's confirm.
    exchange, queue = await sink(channel, routing_keys=["good"])
    twin_ok = message(exchange, routing_key="good")
    twin_bad = message(exchange, routing_key="nowhere", message_id=twin_ok.message_id)
    await enqueue_committed(outbox_database, [twin_bad, twin_ok])
    relay = make_relay()

    assert await relay.relay_once() == 1
    async with await psycopg.AsyncConnection.connect(outbox_database) as conn:
        cur = await conn.execute(
            "SELECT routing_key, sent_at IS NOT NULL, attempts FROM sagaplane_outbox ORDER BY id"
        )
        assert await cur.fetchall() == [("nowhere", False, 1), ("good", True, 0)]
    assert len(await drain(queue, 1)) == 1


async def test_a_relay_on_the_callers_connection_leaves_it_open(
    outbox_database: str,
    outbox_pool: AsyncConnectionPool[Any],
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
) -> None:
    exchange, queue = await sink(channel)
    await enqueue_committed(outbox_database, [message(exchange)])
    relay = OutboxRelay(outbox_pool, amqp)
    assert await relay.relay_once() == 1
    await relay.stop()
    assert not amqp.is_closed
    assert len(await drain(queue, 1, settle=0)) == 1


async def test_a_started_relay_wakes_on_notify(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    relay = make_relay(poll_interval=30.0)
    async with relay:
        assert "sagaplane-outbox-relay" in {t.get_name() for t in asyncio.all_tasks()}
        await wait_for_listener(outbox_database)
        await asyncio.sleep(0.2)  # past the catch-up cycle that follows LISTEN
        loop = asyncio.get_running_loop()
        started = loop.time()
        new = message(exchange)
        await enqueue_committed(outbox_database, [new])
        received = await drain(queue, 1, within=5.0, settle=0)
        elapsed = loop.time() - started
    assert [m.message_id for m in received] == [new.message_id]
    assert elapsed < 2.0
    await relay.stop()  # a second stop is harmless


async def test_two_relays_share_a_table_without_duplicates(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    batches = [[message(exchange) for _ in range(100)] for _ in range(20)]
    relays = [make_relay(batch_size=50, poll_interval=0.2) for _ in range(2)]
    for relay in relays:
        await relay.start()
    await asyncio.gather(*(enqueue_committed(outbox_database, batch) for batch in batches))

    received = Counter(m.message_id for m in await drain(queue, 2000, within=30.0, settle=0.5))
    for relay in relays:
        await relay.stop()
    expected = {m.message_id for batch in batches for m in batch}
    assert set(received) == expected
    assert [mid for mid, n in received.items() if n > 1] == []
    rows = await outbox_rows(outbox_database)
    assert all(row["sent_at"] is not None for row in rows.values())


async def test_the_relay_survives_postgresql_dropping_its_connections(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    relay = make_relay(poll_interval=30.0)
    async with relay:
        await wait_for_listener(outbox_database)
        assert await terminate_backends(outbox_database) >= 1
        new = message(exchange)
        await enqueue_committed(outbox_database, [new])
        received = await drain(queue, 1, within=15.0, settle=0)
        assert [m.message_id for m in received] == [new.message_id]
        # And it listens again: a later row goes out without waiting for the poll.
        await wait_for_listener(outbox_database)
        later = message(exchange)
        await enqueue_committed(outbox_database, [later])
        received = await drain(queue, 1, within=5.0, settle=0)
        assert [m.message_id for m in received] == [later.message_id]


async def test_the_relay_survives_rabbitmq_closing_its_connection(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    relay = make_relay(poll_interval=30.0, connection_name="relay-survives-amqp-close")
    async with relay:
        first = message(exchange)
        await enqueue_committed(outbox_database, [first])
        assert len(await drain(queue, 1, settle=0)) == 1
        await close_amqp_connection("relay-survives-amqp-close")
        second = message(exchange)
        await enqueue_committed(outbox_database, [second])
        received = await drain(queue, 1, within=15.0, settle=0)
        assert [m.message_id for m in received] == [second.message_id]
    rows = await outbox_rows(outbox_database)
    assert all(row["sent_at"] is not None and row["attempts"] == 0 for row in rows.values())


async def test_topology_is_idempotent_and_uses_quorum_queues(
    amqp_vhost: str, channel: AbstractChannel
) -> None:
    actions = ["inventory.reserve", "inventory.release"]
    for _ in range(2):
        await topology.declare_core(channel)
        participant = await topology.declare_participant_queue(channel, "inventory", actions)
    assert participant.name == topology.participant_queue("inventory")

    queues = await list_queues(amqp_vhost)
    for name in (topology.REPLIES_QUEUE, topology.participant_queue("inventory")):
        assert queues[name]["type"] == "quorum"
        arguments = queues[name]["arguments"]
        assert arguments["x-delivery-limit"] == topology.DELIVERY_LIMIT
        assert arguments["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE
    dead = queues[topology.DEAD_LETTER_QUEUE]
    assert dead["type"] == "quorum"
    assert "x-dead-letter-exchange" not in dead["arguments"]
    # Passive declarations succeed only if the queues exist.
    for name in (topology.REPLIES_QUEUE, topology.DEAD_LETTER_QUEUE, participant.name):
        await channel.declare_queue(name, passive=True)

    # Commands route by action, replies by the one routing key; mandatory publishes
    # would be returned (PublishError) if a binding were missing.
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
    replies = await channel.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
    for action in actions:
        await commands.publish(aio_pika.Message(b"c", message_id=action), action, mandatory=True)
    await replies.publish(
        aio_pika.Message(b"r", message_id="r"), topology.REPLIES_ROUTING_KEY, mandatory=True
    )
    with pytest.raises(aiormq.exceptions.PublishError):
        await commands.publish(aio_pika.Message(b"x", message_id="x"), "payment.charge")

    # A message rejected for good reaches the dead-letter queue.
    command = await participant.get(no_ack=False)
    await command.reject(requeue=False)
    dead_letters = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
    dead_letter = None
    for _ in range(100):
        dead_letter = await dead_letters.get(no_ack=True, fail=False)
        if dead_letter is not None:
            break
        await asyncio.sleep(0.05)
    assert dead_letter is not None
    assert dead_letter.message_id == command.message_id
