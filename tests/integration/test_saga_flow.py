"""Sagas travelling for real: coordinator -> RabbitMQ -> participants -> replies."""

from __future__ import annotations

import asyncio
from collections import Counter

import psycopg

from helpers.shop import Shop, order_request, settle, shop, shop_databases, wait_terminal
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

__all__ = ["shop", "shop_databases"]  # fixtures, imported for pytest

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub


async def test_a_three_step_saga_completes_with_each_effect_once(stub: Stub, shop: Shop) -> None:
    saga_id = (await stub.StartSaga(order_request(qty=2))).saga.id
    saga = (await wait_terminal(stub, [saga_id]))[saga_id]

    assert saga.state == model.SAGA_STATE_COMPLETED
    assert [s.status for s in saga.steps] == [model.STEP_STATUS_COMPLETED] * 3
    assert await shop.rows("orders", "SELECT sku, qty, status FROM shop_orders") == [
        ("book", 2, "created")
    ]
    assert await shop.rows("inventory", "SELECT qty, status FROM shop_reservations") == [
        (2, "reserved")
    ]
    assert await shop.rows("payment", "SELECT amount::float, status FROM shop_payments") == [
        (42.0, "charged")
    ]
    # The step's output is what the handler returned.
    assert saga.steps[1].output.fields["reserved"].number_value == 2


async def test_payment_failure_compensates_inventory_then_orders_once_each(
    stub: Stub, shop: Shop
) -> None:
    saga_id = (await stub.StartSaga(order_request(amount=5000))).saga.id
    saga = (await wait_terminal(stub, [saga_id], history=True))[saga_id]

    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert [s.status for s in saga.steps] == [
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_FAILED,
    ]
    assert "over the limit" in saga.steps[2].error
    # NonRetryableError: compensation starts at once, with no retry of the charge.
    assert saga.steps[2].attempts == 1
    actions = [action for _, action, _ in await shop.effects(saga_id)]
    assert actions == ["orders.create", "inventory.reserve", "inventory.release", "orders.delete"]
    assert await shop.rows("orders", "SELECT status FROM shop_orders") == [("cancelled",)]
    assert await shop.rows("inventory", "SELECT status FROM shop_reservations") == [("released",)]
    assert await shop.rows("payment", "SELECT * FROM shop_payments") == []
    assert [(h.event, h.step_name) for h in saga.history] == [
        ("saga_started", ""),
        ("step_dispatched", "create"),
        ("step_completed", "create"),
        ("step_dispatched", "reserve"),
        ("step_completed", "reserve"),
        ("step_dispatched", "charge"),
        ("step_failed", "charge"),
        ("compensation_started", "charge"),
        ("compensation_dispatched", "reserve"),
        ("step_compensated", "reserve"),
        ("compensation_dispatched", "create"),
        ("step_compensated", "create"),
        ("saga_compensated", ""),
    ]


async def test_compensate_on_a_completed_saga_undoes_all_three_steps(
    stub: Stub, shop: Shop
) -> None:
    saga_id = (await stub.StartSaga(order_request())).saga.id
    await wait_terminal(stub, [saga_id])
    await stub.Compensate(api.CompensateRequest(id=saga_id, reason="customer returned it"))
    saga = (await wait_terminal(stub, [saga_id]))[saga_id]

    assert saga.state == model.SAGA_STATE_COMPENSATED
    actions = [action for _, action, _ in await shop.effects(saga_id)]
    assert actions[3:] == ["payment.refund", "inventory.release", "orders.delete"]
    assert await shop.rows("payment", "SELECT status FROM shop_payments") == [("refunded",)]


async def test_every_command_and_reply_delivered_twice_changes_nothing(
    stub: Stub, shop: Shop, database_url: str
) -> None:
    ids = [(await stub.StartSaga(order_request(amount=a))).saga.id for a in (10, 20, 5000)]

    async def redeliver_everything() -> None:
        # Forget that anything was sent: every relay publishes every message again,
        # same message ids and all, as an at-least-once relay may after a crash.
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            await conn.execute("UPDATE sagaplane_outbox SET sent_at = NULL")
            await conn.commit()
        await shop.unsend_outboxes()

    # Duplicates while the sagas are in flight...
    for _ in range(5):
        await redeliver_everything()
        await asyncio.sleep(0.05)
    first = await wait_terminal(stub, ids, history=True)
    effects = await shop.effects()
    # ...and after they ended.
    await redeliver_everything()
    await settle()

    again = await wait_terminal(stub, ids, history=True)
    assert [s.state for s in again.values()] == [
        model.SAGA_STATE_COMPLETED,
        model.SAGA_STATE_COMPLETED,
        model.SAGA_STATE_COMPENSATED,
    ]
    assert again == first  # not one more transition, attempt or history row
    assert await shop.effects() == effects
    per_saga = Counter((saga_id, action) for saga_id, action, _ in effects)
    assert set(per_saga.values()) == {1}
    assert len(effects) == 3 + 3 + 4


async def test_a_reply_for_an_unknown_saga_is_dead_lettered_and_traffic_flows(
    stub: Stub, shop: Shop
) -> None:
    import aio_pika

    from sagaplane import topology
    from sagaplane.v1 import messages_pb2

    async with await aio_pika.connect(shop.amqp_url) as conn:
        channel = await conn.channel()
        replies = await channel.get_exchange(topology.REPLIES_EXCHANGE)
        for body in (
            b"\xff not protobuf",
            messages_pb2.StepReply(
                saga_id="01ARZ3NDEKTSV4RRFFQ69G5FAV",
                step_id="x",
                attempt=1,
                kind=messages_pb2.COMMAND_KIND_EXECUTE,
                outcome=messages_pb2.REPLY_OUTCOME_SUCCEEDED,
            ).SerializeToString(),
        ):
            await replies.publish(
                aio_pika.Message(body, message_id="poison"),
                routing_key=topology.REPLIES_ROUTING_KEY,
            )
        saga_id = (await stub.StartSaga(order_request())).saga.id
        saga = (await wait_terminal(stub, [saga_id]))[saga_id]
        assert saga.state == model.SAGA_STATE_COMPLETED

        dead = await channel.get_queue(topology.DEAD_LETTER_QUEUE)
        bodies = []
        for _ in range(40):
            message = await dead.get(no_ack=True, fail=False)
            if message is None:
                if len(bodies) >= 2:
                    break
                await asyncio.sleep(0.1)
                continue
            bodies.append(message.body)
        assert len(bodies) == 2
