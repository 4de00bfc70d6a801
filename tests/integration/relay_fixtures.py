"""Real PostgreSQL and RabbitMQ for the relay tests: a fresh database and vhost per module.

Import the fixtures into a test module (``from relay_fixtures import ...``). PostgreSQL
settings come from libpq's ``PG*`` variables, RabbitMQ is reached as guest/guest on
127.0.0.1 and managed with ``rabbitmqctl``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aio_pika
import psycopg
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from helpers.broker import amqp_url_for, fresh_vhost, rabbitmqctl
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import migrations
from sagaplane.outbox import OutboundMessage, enqueue
from sagaplane.relay import OutboxRelay


@pytest.fixture(scope="module")
async def outbox_database() -> AsyncIterator[str]:
    """A fresh database with the outbox migrations applied; yields its URL."""
    name = unique_name("sagaplane_test")
    await create_database(name)
    try:
        async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
            await migrations.apply(conn, migrations.outbox_migrations())
        yield server_url(name)
    finally:
        await drop_database(name)


@pytest.fixture(scope="module")
async def outbox_pool(outbox_database: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """The pool the relays claim rows with (tests write through their own connections)."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        outbox_database, min_size=2, max_size=6, open=False
    )
    await pool.open(wait=True)
    yield pool
    await pool.close()


@pytest.fixture
async def clean_outbox(outbox_database: str) -> None:
    """Each test starts from an empty outbox."""
    async with await psycopg.AsyncConnection.connect(outbox_database, autocommit=True) as conn:
        await conn.execute("TRUNCATE sagaplane_outbox")


@pytest.fixture(scope="module")
async def amqp_vhost() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost that guest may use; deleted with all it holds at the end."""
    async with fresh_vhost() as url:
        yield url.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def amqp_url(amqp_vhost: str) -> str:
    """The AMQP URL of the module's vhost."""
    return amqp_url_for(amqp_vhost)


@pytest.fixture
async def amqp(
    amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractRobustConnection]:
    """The test's own connection, named after the test so that it shows in the broker."""
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": f"test:{request.node.name}"}
    )
    yield connection
    await connection.close()


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AbstractChannel:
    """A channel with publisher confirms on the test's connection."""
    return await amqp.channel(publisher_confirms=True, on_return_raises=True)


@pytest.fixture
async def make_relay(
    outbox_pool: AsyncConnectionPool[Any], amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., OutboxRelay]]:
    """Builds relays on the module's pool and vhost; every one is stopped at the end."""
    relays: list[OutboxRelay] = []

    def make(**kwargs: Any) -> OutboxRelay:
        kwargs.setdefault("connection_name", f"relay{len(relays)}:{request.node.name}")
        relay = OutboxRelay(outbox_pool, amqp_url, **kwargs)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.stop()


async def sink(
    channel: AbstractChannel, routing_keys: Iterable[str] = ("#",)
) -> tuple[str, AbstractQueue]:
    """A fresh topic exchange and an exclusive queue bound to it with ``routing_keys``."""
    exchange = await channel.declare_exchange(unique_name("test"), aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(unique_name("test"), exclusive=True)
    for key in routing_keys:
        await queue.bind(exchange, routing_key=key)
    return exchange.name, queue


def message(exchange: str, routing_key: str = "step.run", **overrides: Any) -> OutboundMessage:
    """An outbox message with a fresh message id."""
    fields: dict[str, Any] = {
        "message_id": uuid.uuid4().hex,
        "exchange": exchange,
        "routing_key": routing_key,
        "message_type": "sagaplane.v1.StepCommand",
        "body": os.urandom(16),
        "correlation_id": "saga-1",
    }
    fields.update(overrides)
    return OutboundMessage(**fields)


async def enqueue_committed(database_url: str, messages: list[OutboundMessage]) -> None:
    """Write ``messages`` to the outbox in one committed transaction."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await enqueue(conn, messages)
        await conn.commit()


async def outbox_rows(database_url: str) -> dict[str, dict[str, Any]]:
    """Every outbox row, keyed by message id."""
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        cur = await conn.execute("SELECT * FROM sagaplane_outbox ORDER BY id")
        return {row["message_id"]: row for row in await cur.fetchall()}


async def drain(
    queue: AbstractQueue, count: int, *, within: float = 10.0, settle: float = 0.3
) -> list[AbstractIncomingMessage]:
    """Take at least ``count`` messages (waiting up to ``within`` s), then any stragglers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    got: list[AbstractIncomingMessage] = []
    while len(got) < count and loop.time() < deadline:
        received = await queue.get(no_ack=True, fail=False)
        if received is None:
            await asyncio.sleep(0.02)
        else:
            got.append(received)
    # Duplicates would arrive after the originals; give them a moment to show.
    await asyncio.sleep(settle)
    while (received := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(received)
    return got


async def wait_for_listener(database_url: str, *, count: int = 1, within: float = 10.0) -> None:
    """Wait until ``count`` sessions LISTEN on the outbox channel of the database."""
    dbname = database_url.rsplit("/", 1)[1]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND state = 'idle' AND query ILIKE 'LISTEN%%'",
                (dbname,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= count:
                return
            if loop.time() > deadline:
                raise TimeoutError("the relay never started listening")
            await asyncio.sleep(0.05)


async def terminate_backends(database_url: str) -> int:
    """Kill every session on the database but our own (a PostgreSQL restart, as seen
    by one database); returns how many were killed."""
    dbname = database_url.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(
        server_url("postgres"), autocommit=True
    ) as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def close_amqp_connection(connection_name: str, *, within: float = 10.0) -> None:
    """Have the broker close the connection named ``connection_name`` (as a restart would)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    needle = f'{{"connection_name","{connection_name}"}}'
    while True:
        out = await rabbitmqctl(
            "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
        )
        for line in out.splitlines():
            pid, _, properties = line.partition("\t")
            if needle in properties:
                await rabbitmqctl("close_connection", pid, "sagaplane relay test")
                return
        if loop.time() > deadline:
            raise TimeoutError(f"no AMQP connection named {connection_name!r}")
        await asyncio.sleep(0.2)


async def list_queues(vhost: str) -> dict[str, dict[str, Any]]:
    """The vhost's queues as the broker sees them: name -> {type, arguments}."""
    out = await rabbitmqctl(
        "list_queues", "-p", vhost, "-q", "--formatter", "json", "name", "type", "arguments"
    )
    return {
        entry["name"]: {
            "type": entry["type"],
            "arguments": {arg[0]: arg[2] for arg in entry["arguments"]},
        }
        for entry in json.loads(out or "[]")
    }
