"""A domain event emitted by the Python SDK, read by a consumer that knows only the
CloudEvents spec and a plain AMQP client (examples/node-participant/events.js, amqplib)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from polyglot_tools import NODE_PARTICIPANT, toolchain_missing
from psycopg_pool import AsyncConnectionPool

from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import events, migrations
from sagaplane.relay import OutboxRelay


@pytest.fixture
async def emitter_database() -> AsyncIterator[str]:
    """A fresh database with the outbox: a service that emits events."""
    name = unique_name("sagaplane_emitter")
    await create_database(name)
    try:
        async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
            await migrations.apply(conn, migrations.outbox_migrations())
        yield server_url(name)
    finally:
        await drop_database(name)


async def test_a_plain_amqp_consumer_reads_the_sdks_events_by_the_cloudevents_spec(
    amqp_url: str, emitter_database: str
) -> None:
    if shutil.which("node") is None:
        toolchain_missing("node is not installed")
    if not (NODE_PARTICIPANT / "node_modules" / "amqplib").is_dir():
        toolchain_missing("examples/node-participant has no node_modules")
    node = await asyncio.create_subprocess_exec(
        "node",
        "events.js",
        "order.*",
        "1",
        cwd=NODE_PARTICIPANT,
        env={"PATH": "/usr/bin:/bin", "SAGAPLANE_AMQP_URL": amqp_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert node.stdout is not None
        async with asyncio.timeout(30):
            ready = json.loads(await node.stdout.readline())
        assert ready["op"] == "ready", ready

        async with await psycopg.AsyncConnection.connect(emitter_database) as conn:
            sent = await events.emit(
                conn,
                "order.created",
                {"order_id": "o-1", "amount": 42, "items": ["book"]},
                source="orders",
                subject="o-1",
                extensions={"tenant": "acme"},
            )
            await conn.commit()
        async with AsyncConnectionPool(emitter_database, open=False) as pool:
            relay = OutboxRelay(pool, amqp_url, connection_name="test:polyglot-events")
            try:
                assert await relay.relay_once() == 1
            finally:
                await relay.stop()

        async with asyncio.timeout(30):
            out, err = await node.communicate()
        assert node.returncode == 0, err.decode()
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()

    [line] = [json.loads(raw) for raw in out.decode().splitlines() if raw.strip()]
    assert line["op"] == "event", line
    assert line["routingKey"] == "order.created"
    assert line["contentType"] == "application/cloudevents+json"
    assert line["messageId"] == sent.id
    got: dict[str, Any] = line["event"]
    assert got["specversion"] == "1.0"
    assert (got["id"], got["source"], got["type"], got["subject"]) == (
        sent.id,
        "orders",
        "order.created",
        "o-1",
    )
    assert got["datacontenttype"] == "application/json"
    assert got["data"] == {"order_id": "o-1", "amount": 42, "items": ["book"]}
    assert got["tenant"] == "acme"
    assert sent.time is not None
    assert got["time"].startswith(sent.time.strftime("%Y-%m-%dT%H:%M:%S"))
