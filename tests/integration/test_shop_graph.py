"""The demo shop's order saga, a graph, for real: create, then reserve beside
validate_address, gift_wrap only for a gift, then charge with the order id that create
returned (examples/shop/services.py)."""

from __future__ import annotations

from collections import Counter

from helpers.shop import Shop, graph_order_request, settle, shop, shop_databases, wait_terminal
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

__all__ = ["shop", "shop_databases"]  # fixtures, imported for pytest

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub

NAMES = ["create", "reserve", "validate_address", "gift_wrap", "charge"]


async def order_ids(shop: Shop, saga_id: str) -> dict[str, list[object]]:
    """The order id each service's table holds for the saga."""
    tables = {
        "orders": "SELECT id FROM shop_orders",
        "fulfillment": "SELECT order_id FROM shop_addresses",
        "payment": "SELECT order_id FROM shop_payments",
    }
    found = {}
    for service, query in tables.items():
        found[service] = [
            r[0] for r in await shop.rows(service, query + " WHERE saga_id = %s", saga_id)
        ]
    found["gift_wraps"] = [
        r[0]
        for r in await shop.rows(
            "fulfillment", "SELECT order_id FROM shop_gift_wraps WHERE saga_id = %s", saga_id
        )
    ]
    return found


async def test_a_gift_order_runs_every_step_and_passes_the_order_id(stub: Stub, shop: Shop) -> None:
    saga_id = (await stub.StartSaga(graph_order_request(gift=True))).saga.id
    saga = (await wait_terminal(stub, [saga_id], history=True))[saga_id]

    assert saga.state == model.SAGA_STATE_COMPLETED
    assert [s.name for s in saga.steps] == NAMES
    assert [s.status for s in saga.steps] == [model.STEP_STATUS_COMPLETED] * 5
    # reserve and validate_address were dispatched in one transition, when create completed.
    dispatched = {
        h.step_name: h.at.ToDatetime() for h in saga.history if h.event == "step_dispatched"
    }
    assert dispatched["reserve"] == dispatched["validate_address"]
    assert dispatched["charge"] > max(dispatched["gift_wrap"], dispatched["validate_address"])
    # charge was given the order id, a number, in its input: GetSaga shows it resolved.
    order_id = saga.steps[0].output.fields["order_id"].number_value
    charge_input = saga.steps[4].input.fields
    assert charge_input["order_id"].WhichOneof("kind") == "number_value"
    assert charge_input["order_id"].number_value == order_id
    assert charge_input["amount"].number_value == 42
    # ...and each service stored the id orders.create returned.
    assert await order_ids(shop, saga_id) == {
        "orders": [order_id],
        "fulfillment": [order_id],
        "payment": [order_id],
        "gift_wraps": [order_id],
    }


async def test_a_refused_payment_skips_the_gift_wrap_and_undoes_what_was_done(
    stub: Stub, shop: Shop
) -> None:
    saga_id = (await stub.StartSaga(graph_order_request(amount=5000, gift=False))).saga.id
    saga = (await wait_terminal(stub, [saga_id], history=True))[saga_id]

    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert [s.status for s in saga.steps] == [
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_COMPLETED,  # validate_address: nothing to undo
        model.STEP_STATUS_SKIPPED,  # gift_wrap: context.gift is false
        model.STEP_STATUS_FAILED,
    ]
    assert "over the limit" in saga.steps[4].error
    skipped = [h for h in saga.history if h.event == "step_skipped"]
    assert [(h.step_name, h.reason) for h in skipped] == [
        ("gift_wrap", "when 'context.gift == true' is false")
    ]
    actions = [action for _, action, _ in await shop.effects(saga_id)]
    assert sorted(actions[1:3]) == ["fulfillment.validate_address", "inventory.reserve"]
    assert [actions[0], *actions[3:]] == ["orders.create", "inventory.release", "orders.delete"]
    assert await shop.rows("fulfillment", "SELECT * FROM shop_gift_wraps") == []
    assert await shop.rows("payment", "SELECT * FROM shop_payments") == []
    assert await shop.rows("orders", "SELECT status FROM shop_orders") == [("cancelled",)]


async def test_compensating_a_gift_order_undoes_each_step_after_its_dependents(
    stub: Stub, shop: Shop
) -> None:
    saga_id = (await stub.StartSaga(graph_order_request(gift=True))).saga.id
    await wait_terminal(stub, [saga_id])
    await stub.Compensate(api.CompensateRequest(id=saga_id, reason="returned"))
    saga = (await wait_terminal(stub, [saga_id]))[saga_id]
    await settle(0.5)

    assert saga.state == model.SAGA_STATE_COMPENSATED
    effects = await shop.effects(saga_id)
    actions = [action for _, action, _ in effects]
    assert actions[5:] == [
        "payment.refund",
        "fulfillment.unwrap",
        "inventory.release",
        "orders.delete",
    ]
    assert Counter(actions).most_common(1)[0][1] == 1, "an effect happened twice"
    assert await shop.rows("fulfillment", "SELECT status FROM shop_gift_wraps") == [("unwrapped",)]
    # The address check has no compensation: it stays as it was.
    assert saga.steps[2].status == model.STEP_STATUS_COMPLETED
