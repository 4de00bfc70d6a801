"""Every outbox row's status, and ``sagaplane outbox`` / ``sagaplane relay``, against the
real PostgreSQL and RabbitMQ: a row for a missing exchange ends invalid at once, a row past
max_age expires unpublished, an unroutable command is failed (retrying) until a queue is
bound, then published, and a broker outage (a proxy the test cuts) leaves rows failed with
the error, never parked, then published when it is back; operators see each of these,
retry and discard rows. The coordinator's relay takes the same SAGAPLANE_OUTBOX_* settings
as ``sagaplane relay``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aio_pika.abc import AbstractChannel
from psycopg_pool import AsyncConnectionPool
from relay_fixtures import (
    amqp,
    amqp_url,
    amqp_vhost,
    channel,
    clean_outbox,
    drain,
    enqueue_committed,
    make_relay,
    message,
    outbox_database,
    outbox_pool,
    outbox_rows,
    sink,
)

from helpers.broker import AMQP_HOST
from helpers.tcp_proxy import TcpProxy
from sagaplane import events, topology
from sagaplane.outbox import OutboundMessage
from sagaplane.relay import OutboxRelay
from sagaplane.testing import Child

# database_url (a migrated coordinator database) comes from tests/conftest.py.
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

ROOT = Path(__file__).resolve().parents[2]
MakeRelay = Callable[..., OutboxRelay]


async def sagaplane(*argv: str) -> tuple[int, str, str]:
    """``sagaplane *argv`` as a process: its status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.cli", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def stats(database_url: str) -> dict[str, Any]:
    status, out, err = await sagaplane("outbox", "stats", "--database-url", database_url, "--json")
    assert status == 0, err
    return dict(json.loads(out))


async def written_hours_ago(database_url: str, message: OutboundMessage, hours: int) -> None:
    """Make the outbox row of ``message`` look written ``hours`` ago."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE sagaplane_outbox SET created_at = now() - make_interval(hours => %s)"
            " WHERE message_id = %s",
            (hours, message.message_id),
        )


async def statuses_become(
    database_url: str, messages: list[OutboundMessage], status: str, *, within: float = 30.0
) -> list[dict[str, Any]]:
    """The rows of ``messages`` once every one of them is in ``status``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        rows = await outbox_rows(database_url)
        found = [rows[m.message_id] for m in messages]
        if all(row["status"] == status for row in found):
            return found
        if loop.time() > deadline:
            raise AssertionError(f"not all {status}: {[r['status'] for r in found]}")
        await asyncio.sleep(0.1)


async def listed(database_url: str, *flags: str) -> list[dict[str, Any]]:
    status, out, err = await sagaplane(
        "outbox", "list", "--database-url", database_url, "--json", *flags
    )
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_a_row_for_a_missing_exchange_is_invalid_at_once_with_its_error(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, _ = await sink(channel)
    gone = message("no-such-exchange")
    good = message(exchange)
    await enqueue_committed(outbox_database, [gone, good])

    assert await make_relay(max_attempts=20).relay_once() == 1
    row = (await outbox_rows(outbox_database))[gone.message_id]
    assert row["status"] == "invalid" and row["parked_at"] is not None
    assert "no-such-exchange" in row["last_error"] and "NOT_FOUND" in row["last_error"]
    assert (await stats(outbox_database))["counts"] == {
        "pending": 0,
        "failed": 0,
        "published": 1,
        "invalid": 1,
        "expired": 0,
    }
    [shown] = await listed(outbox_database)
    assert (shown["message_id"], shown["status"]) == (gone.message_id, "invalid")
    assert "NOT_FOUND" in shown["last_error"]
    status, out, _ = await sagaplane("outbox", "list", "--database-url", outbox_database)
    assert status == 0 and "invalid" in out and "no-such-exchange" in out

    # A person creates the exchange and retries the row: it is published.
    await channel.declare_exchange("no-such-exchange", "fanout", auto_delete=True)
    bound = await channel.declare_queue(exclusive=True)
    await bound.bind("no-such-exchange")
    status, out, _ = await sagaplane(
        "outbox", "retry", str(row["id"]), "--database-url", outbox_database
    )
    assert status == 0 and f"outbox row {row['id']}: back to pending" in out
    assert await make_relay().relay_once() == 1
    assert [m.message_id for m in await drain(bound, 1)] == [gone.message_id]
    assert (await outbox_rows(outbox_database))[gone.message_id]["status"] == "published"


async def test_a_row_older_than_max_age_expires_and_is_not_published(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, queue = await sink(channel)
    late, fresh = message(exchange), message(exchange)
    await enqueue_committed(outbox_database, [late, fresh])
    await written_hours_ago(outbox_database, late, 2)

    assert await make_relay(max_age=3600).relay_once() == 1
    rows = await outbox_rows(outbox_database)
    assert rows[late.message_id]["status"] == "expired"
    assert "max_age" in rows[late.message_id]["last_error"]
    assert rows[fresh.message_id]["status"] == "published"
    assert [m.message_id for m in await drain(queue, 1)] == [fresh.message_id]
    found = await stats(outbox_database)
    assert found["counts"]["expired"] == 1 and found["oldest_pending_s"] is None
    assert [r["status"] for r in await listed(outbox_database, "--status", "expired")] == [
        "expired"
    ]

    status, out, _ = await sagaplane(
        "outbox", "discard", str(rows[late.message_id]["id"]), "999999",
        "--database-url", outbox_database,
    )  # fmt: skip
    assert status == 4  # one of them does not exist
    assert "discarded" in out and "outbox row 999999: no such unpublished row" in out
    assert late.message_id not in await outbox_rows(outbox_database)


async def test_an_unroutable_command_is_failed_until_a_queue_is_bound_then_published(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, _ = await sink(channel, routing_keys=["other"])
    command = message(exchange, routing_key="late.action")
    await enqueue_committed(outbox_database, [command])
    relay = make_relay(retry_initial=0.0)

    assert await relay.relay_once() == 0
    row = (await outbox_rows(outbox_database))[command.message_id]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    found = await stats(outbox_database)
    assert found["counts"]["failed"] == 1 and found["oldest_pending_s"] >= 0
    [shown] = await listed(outbox_database)
    assert shown["status"] == "failed" and "NO_ROUTE" in shown["last_error"]

    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="late.action")
    assert await relay.relay_once() == 1
    assert (await outbox_rows(outbox_database))[command.message_id]["status"] == "published"
    assert [m.message_id for m in await drain(queue, 1)] == [command.message_id]


async def test_failed_rows_retry_after_an_exponential_backoff_with_jitter(
    outbox_database: str, channel: AbstractChannel, make_relay: MakeRelay
) -> None:
    exchange, _ = await sink(channel, routing_keys=["other"])
    commands = [message(exchange, routing_key="nobody.listens") for _ in range(5)]
    await enqueue_committed(outbox_database, commands)
    relay = make_relay(retry_initial=10.0, retry_max=1000.0)

    assert await relay.relay_once() == 0
    rows = [(await outbox_rows(outbox_database))[m.message_id] for m in commands]
    waits = [(r["next_attempt_at"] - r["failed_at"]).total_seconds() for r in rows]
    # sagaplane.backoff after the first failure: 2 * 10 s, jittered between half and all.
    assert all(10.0 - 0.1 <= wait <= 20.0 + 0.1 for wait in waits), waits
    assert len({round(wait, 3) for wait in waits}) > 1, waits  # not retried together
    assert {r["attempts"] for r in rows} == {1}


async def test_a_broker_outage_leaves_rows_failed_with_the_error_then_published(
    outbox_database: str,
    outbox_pool: AsyncConnectionPool[Any],
    amqp_vhost: str,
    channel: AbstractChannel,
) -> None:
    exchange, queue = await sink(channel)
    host, port = AMQP_HOST.rsplit(":", 1)
    async with TcpProxy(host, int(port)) as proxy:
        # max_attempts=1: a row charged for the outage would be parked at its first failure.
        relay = OutboxRelay(
            outbox_pool,
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/{amqp_vhost}",
            max_attempts=1,
            confirm_timeout=2.0,
            max_backoff=0.5,
            poll_interval=0.2,
            connection_name="relay-behind-a-proxy",
        )
        async with relay:
            first = message(exchange)
            await enqueue_committed(outbox_database, [first])
            assert [m.message_id for m in await drain(queue, 1, settle=0)] == [first.message_id]

            await proxy.cut()
            stuck = [message(exchange) for _ in range(3)]
            await enqueue_committed(outbox_database, stuck)
            for row in await statuses_become(outbox_database, stuck, "failed"):
                assert row["attempts"] == 0 and row["parked_at"] is None
                assert row["next_attempt_at"] is None  # it goes as soon as the broker is back
                assert "no connection to RabbitMQ" in row["last_error"]
                assert row["failed_at"] is not None
            found = await stats(outbox_database)
            assert found["counts"]["failed"] == 3 and found["counts"]["published"] == 1
            assert "no connection to RabbitMQ" in found["last_error"]
            assert "guest:guest" not in found["last_error"]  # the password is masked
            status, out, _ = await sagaplane("outbox", "stats", "--database-url", outbox_database)
            assert status == 0 and "last failure (3 failed" in out
            assert "no connection to RabbitMQ" in out
            assert {r["status"] for r in await listed(outbox_database)} == {"failed"}

            # Long enough for many more cycles: an outage is never charged, nothing parks.
            await asyncio.sleep(3)
            rows = await outbox_rows(outbox_database)
            assert {rows[m.message_id]["status"] for m in stuck} == {"failed"}
            assert {rows[m.message_id]["attempts"] for m in stuck} == {0}

            await proxy.restore()
            received = await drain(queue, 3, within=30, settle=0)
            assert {m.message_id for m in received} == {m.message_id for m in stuck}
            await statuses_become(outbox_database, stuck, "published")
    found = await stats(outbox_database)
    assert found["counts"]["published"] == 4 and found["counts"]["failed"] == 0
    assert found["last_error"] is None


async def test_while_the_broker_is_away_rows_past_max_age_still_expire(
    outbox_database: str, outbox_pool: AsyncConnectionPool[Any], amqp_vhost: str
) -> None:
    late, fresh = message("sagaplane.events"), message("sagaplane.events")
    await enqueue_committed(outbox_database, [late, fresh])
    await written_hours_ago(outbox_database, late, 2)
    host, port = AMQP_HOST.rsplit(":", 1)
    async with TcpProxy(host, int(port)) as proxy:
        await proxy.cut()  # a broker that has been away since before the relay started
        relay = OutboxRelay(
            outbox_pool,
            f"amqp://guest:guest@127.0.0.1:{proxy.port}/{amqp_vhost}",
            max_age=3600,
            confirm_timeout=2.0,
        )
        try:
            with pytest.raises(ConnectionError, match="connection refused"):
                await relay.relay_once()
        finally:
            await relay.stop()
    rows = await outbox_rows(outbox_database)
    assert rows[late.message_id]["status"] == "expired"
    assert rows[fresh.message_id]["status"] == "failed"
    assert "connection refused" in rows[fresh.message_id]["last_error"]
    assert rows[fresh.message_id]["attempts"] == 0


async def test_a_coordinator_started_with_an_outbox_max_age_expires_late_rows(
    database_url: str, amqp_url: str
) -> None:
    late, fresh = message(topology.EVENTS_EXCHANGE), message(topology.EVENTS_EXCHANGE)
    await enqueue_committed(database_url, [late, fresh])
    await written_hours_ago(database_url, late, 2)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    coordinator = Child(
        "coordinator",
        [sys.executable, "-m", "coordinator.cli", "serve", "--no-migrate"],
        cwd=ROOT,
        env=clean
        | {
            "SAGAPLANE_DATABASE_URL": database_url,
            "SAGAPLANE_AMQP_URL": amqp_url,
            "SAGAPLANE_LISTEN": "127.0.0.1:0",
            "SAGAPLANE_OUTBOX_MAX_AGE": "3600",
        },
    )
    await coordinator.start()
    try:
        await statuses_become(database_url, [late], "expired", within=60)
        await statuses_become(database_url, [fresh], "published", within=10)
    finally:
        assert await coordinator.stop() == 0, coordinator.tail()
    assert (await stats(database_url))["counts"]["expired"] == 1


async def test_sagaplane_relay_publishes_an_outbox_on_its_own(
    outbox_database: str, amqp_url: str, channel: AbstractChannel
) -> None:
    await topology.declare_core(channel)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(topology.EVENTS_EXCHANGE, routing_key="user.*")
    worker = Child(
        "relay",
        [sys.executable, "-m", "coordinator.cli", "relay", "--database-url", outbox_database,
         "--amqp-url", amqp_url],
        cwd=ROOT,
    )  # fmt: skip
    await worker.start()
    try:
        async with await psycopg.AsyncConnection.connect(outbox_database) as conn:
            sent = await events.emit(conn, "user.signed_up", {"user": 1}, source="web")
            await conn.commit()
        [got] = await drain(queue, 1, within=60)
        assert got.message_id == sent.id
    finally:
        assert await worker.stop() == 0, worker.tail()
