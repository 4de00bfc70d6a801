"""One saga across languages: a step in a Python participant (the demo shop's orders
service, in this process) and a step in the Node.js participant
(examples/node-participant, a child process), both on the test's RabbitMQ vhost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest
from polyglot_tools import (
    NodeParticipant,
    by_name,
    go_quickstart,
    json_lines,
    node_participant,
    node_quickstart,
    run,
)

from coordinator.app import Coordinator
from examples.shop.services import create_tables, orders
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import structs, topology
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

__all__ = ["go_quickstart", "node_participant", "node_quickstart"]  # fixtures, for pytest

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub


@pytest.fixture
async def orders_database(amqp_url: str) -> AsyncIterator[str]:
    """A fresh database with the shop's orders tables."""
    name = unique_name("sagaplane_orders")
    await create_database(name)
    try:
        await create_tables("orders", server_url(name))
        yield server_url(name)
    finally:
        await drop_database(name)


@pytest.fixture
async def orders_participant(amqp_url: str, orders_database: str) -> AsyncIterator[str]:
    """The shop's orders service (the Python SDK) running in this process."""
    async with orders(amqp_url, orders_database):
        yield orders_database


async def wait_state(stub: Stub, saga_id: str, state: int, timeout: float = 60.0) -> model.Saga:
    deadline = time.monotonic() + timeout
    while True:
        saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
        if saga.state == state:
            return saga
        if time.monotonic() > deadline:
            pytest.fail(
                f"saga {saga_id} is {model.SagaState.Name(saga.state)}, "
                f"not {model.SagaState.Name(state)}, after {timeout}s"
            )
        await asyncio.sleep(0.05)


async def order_rows(database_url: str, saga_id: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT sku, qty, status FROM shop_orders WHERE saga_id = %s", (saga_id,)
        )
        return await cur.fetchall()


async def test_a_saga_runs_a_python_step_then_a_node_step_and_completes(
    coordinator: Coordinator,
    stub: Stub,
    orders_participant: str,
    node_participant: NodeParticipant,
    node_quickstart: Path,
) -> None:
    """Started from the Node.js client, which waits for the end; then compensated."""
    _, out, _ = await run(
        "node",
        node_quickstart,
        "--address",
        f"127.0.0.1:{coordinator.port}",
        "--wait",
        "60",
        cwd=node_quickstart.parent,
    )
    ended = json_lines(out)["end"]["saga"]
    assert ended["state"] == "SAGA_STATE_COMPLETED", ended
    steps = by_name(ended["steps"])
    assert steps["create"]["status"] == steps["ship"]["status"] == "STEP_STATUS_COMPLETED"
    assert isinstance(steps["create"]["output"]["order_id"], int)  # from Python
    assert steps["ship"]["output"] == {  # from Node.js
        "shipment_id": f"shp-{steps['ship']['id']}",
        "address": "1 Main St",
        "sku": "book",
        # Python's output, passed to the Node.js step by the coordinator, by reference.
        "order_id": steps["create"]["output"]["order_id"],
    }
    saga_id = ended["id"]
    assert await order_rows(orders_participant, saga_id) == [("book", 1, "created")]
    [handled] = node_participant.handled("shipping.schedule")
    assert handled["sagaId"] == saga_id and handled["kind"] == "COMMAND_KIND_EXECUTE"
    assert handled["outcome"] == "REPLY_OUTCOME_SUCCEEDED" and handled["attempt"] == 1

    # Undo it all: the Node.js step's compensation gets the output its action returned,
    # then the Python step's runs.
    await stub.Compensate(api.CompensateRequest(id=saga_id, reason="customer cancelled"))
    saga = await wait_state(stub, saga_id, model.SAGA_STATE_COMPENSATED)
    assert [s.status for s in saga.steps] == [model.STEP_STATUS_COMPENSATED] * 2
    [cancel] = node_participant.handled("shipping.cancel")
    assert cancel["kind"] == "COMMAND_KIND_COMPENSATE"
    assert cancel["outcome"] == "REPLY_OUTCOME_SUCCEEDED"
    assert await order_rows(orders_participant, saga_id) == [("book", 1, "cancelled")]


async def test_the_go_quickstart_runs_its_saga_to_the_end(
    coordinator: Coordinator,
    orders_participant: str,
    node_participant: NodeParticipant,
    go_quickstart: Path,
) -> None:
    """The Go client's quickstart, with the participants it needs, waits for the end."""
    _, out, _ = await run(
        go_quickstart,
        "-address",
        f"127.0.0.1:{coordinator.port}",
        "-wait",
        "60s",
        cwd=go_quickstart.parent,
    )
    ended = json_lines(out)["end"]["saga"]
    assert ended["state"] == "SAGA_STATE_COMPLETED", ended
    steps = by_name(ended["steps"])
    assert steps["ship"]["output"]["order_id"] == steps["create"]["output"]["order_id"]
    assert await order_rows(orders_participant, ended["id"]) == [("book", 1, "created")]


async def test_a_node_step_that_fails_compensates_the_python_step(
    coordinator: Coordinator,
    stub: Stub,
    orders_participant: str,
    node_participant: NodeParticipant,
) -> None:
    """The Node.js participant's StepError (non-retryable) reaches the coordinator."""
    request = api.StartSagaRequest(
        name="order.ship",
        steps=[
            api.StepSpec(
                name="create",
                action="orders.create",
                compensation="orders.delete",
                input=structs.to_struct({"sku": "pen", "qty": 3}),
            ),
            # No address: shipping.schedule refuses, non-retryably.
            api.StepSpec(name="ship", action="shipping.schedule", compensation="shipping.cancel"),
        ],
    )
    saga_id = (await stub.StartSaga(request)).saga.id
    saga = await wait_state(stub, saga_id, model.SAGA_STATE_COMPENSATED)
    create, ship = saga.steps
    assert create.status == model.STEP_STATUS_COMPENSATED
    assert ship.status == model.STEP_STATUS_FAILED
    assert "input.address is required" in ship.error
    assert ship.attempts == 1  # non-retryable: never retried
    [failed] = node_participant.handled("shipping.schedule")
    assert failed["outcome"] == "REPLY_OUTCOME_FAILED"
    assert failed["error"] == {
        "type": "InvalidInput",
        "message": "input.address is required",
        "retryable": False,
    }
    assert node_participant.handled("shipping.cancel") == []  # it never completed
    assert await order_rows(orders_participant, saga_id) == [("pen", 3, "cancelled")]


async def test_the_node_participant_declares_the_python_sdks_topology(
    amqp_url: str, node_participant: NodeParticipant
) -> None:
    """The Python SDK re-declares the queues the Node.js participant declared, with the
    same arguments: RabbitMQ would refuse (PRECONDITION_FAILED) any difference."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await topology.declare_core(channel)
        queue = await topology.declare_participant_queue(
            channel, "shipping", ["shipping.schedule", "shipping.cancel"]
        )
        assert queue.name == "sagaplane.participant.shipping"
        # Passive declarations see what the Node.js participant made.
        for name in (topology.REPLIES_QUEUE, topology.DEAD_LETTER_QUEUE):
            await channel.declare_queue(name, passive=True)
