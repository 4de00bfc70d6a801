"""The gRPC API against a real coordinator, a real channel and the real PostgreSQL."""

from __future__ import annotations

from typing import Any

import aio_pika
import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from coordinator import engine
from coordinator.app import Coordinator
from coordinator.engine import CommandKind
from coordinator.store.repository import SagaStore
from sagaplane import structs, topology
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc, messages_pb2
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub


def order_request(**overrides: Any) -> api.StartSagaRequest:
    request = api.StartSagaRequest(
        name="order.place",
        steps=[
            api.StepSpec(
                name="create",
                action="orders.create",
                compensation="orders.delete",
                input=structs.to_struct({"sku": "book", "qty": 2}),
            ),
            api.StepSpec(
                name="reserve", action="inventory.reserve", compensation="inventory.release"
            ),
            api.StepSpec(name="charge", action="payment.charge", compensation="payment.refund"),
        ],
        context=structs.to_struct({"customer": "c-1", "total": 42.5}),
    )
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


async def outbox_commands(database_url: str, saga_id: str) -> list[messages_pb2.StepCommand]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT routing_key, message_type, body FROM sagaplane_outbox"
            " WHERE correlation_id = %s ORDER BY id",
            (saga_id,),
        )
        commands = []
        for routing_key, message_type, body in await cur.fetchall():
            assert message_type == "sagaplane.v1.StepCommand"
            command = messages_pb2.StepCommand.FromString(body)
            assert command.action == routing_key
            commands.append(command)
        return commands


async def test_start_records_the_saga_and_queues_the_first_command(
    stub: Stub, database_url: str
) -> None:
    saga = (await stub.StartSaga(order_request())).saga

    assert len(saga.id) == 26
    assert saga.state == model.SAGA_STATE_STARTED
    assert [s.status for s in saga.steps] == [
        model.STEP_STATUS_STARTED,
        model.STEP_STATUS_PENDING,
        model.STEP_STATUS_PENDING,
    ]
    assert saga.steps[0].attempts == 1
    assert structs.to_dict(saga.steps[0].input) == {"sku": "book", "qty": 2}
    assert structs.to_dict(saga.context) == {"customer": "c-1", "total": 42.5}
    assert saga.HasField("created_at") and not saga.HasField("completed_at")

    (command,) = await outbox_commands(database_url, saga.id)
    assert command.kind == messages_pb2.COMMAND_KIND_EXECUTE
    assert (command.step_id, command.attempt) == (saga.steps[0].id, 1)
    assert command.action == "orders.create"
    assert structs.to_dict(command.context) == {"customer": "c-1", "total": 42.5}
    assert len(command.token) >= 16


async def test_get_returns_the_saga_with_its_history(stub: Stub) -> None:
    started = (await stub.StartSaga(order_request())).saga

    without = (await stub.GetSaga(api.GetSagaRequest(id=started.id))).saga
    assert without.id == started.id and not without.history
    assert list(without.steps) == list(started.steps)

    saga = (await stub.GetSaga(api.GetSagaRequest(id=started.id, include_history=True))).saga
    assert [(h.event, h.step_name) for h in saga.history] == [
        ("saga_started", ""),
        ("step_dispatched", "create"),
    ]
    assert saga.history[0].from_state == model.SAGA_STATE_UNSPECIFIED
    assert saga.history[0].to_state == model.SAGA_STATE_STARTED
    assert all(h.HasField("at") for h in saga.history)


async def test_unknown_and_malformed_ids_are_not_found(stub: Stub) -> None:
    for saga_id in ("01ARZ3NDEKTSV4RRFFQ69G5FAV", "not-an-id", "x" * 500):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSaga(api.GetSagaRequest(id=saga_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Compensate(api.CompensateRequest(id=saga_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_active_pages_newest_first_and_stably(stub: Stub) -> None:
    ids = [(await stub.StartSaga(order_request())).saga.id for _ in range(7)]
    other = (await stub.StartSaga(order_request(name="refund.issue"))).saga.id

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListActive(
            api.ListActiveRequest(page_size=3, page_token=token, name="order.place")
        )
        seen += [s.id for s in page.sagas]
        pages += 1
        if pages == 1:
            # A saga started between pages is newer than the cursor: it must not
            # shift, repeat or drop anything in the pages that follow.
            await stub.StartSaga(order_request())
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(ids, reverse=True)
    assert pages == 3

    everything = await stub.ListActive(api.ListActiveRequest(page_size=100))
    assert other in [s.id for s in everything.sagas]
    assert len(everything.sagas) == 9 and not everything.next_page_token
    assert all(len(s.steps) == 3 for s in everything.sagas)


async def test_list_active_leaves_out_finished_sagas(stub: Stub, coordinator: Coordinator) -> None:
    saga_id = (await stub.StartSaga(order_request())).saga.id
    await drive(coordinator, saga_id, [True, True, True])
    page = await stub.ListActive(api.ListActiveRequest())
    assert saga_id not in [s.id for s in page.sagas]


async def test_compensate_is_recorded_and_idempotent(stub: Stub, amqp_url: str) -> None:
    async with await aio_pika.connect(amqp_url) as connection:
        # A queue takes the first command, as a participant's would: it may have been
        # delivered, so it is awaited (a command that reached no queue would not be).
        channel = await connection.channel()
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(commands, "orders.create")
        saga_id = (await stub.StartSaga(order_request())).saga.id
        answer = await stub.Compensate(api.CompensateRequest(id=saga_id, reason="customer left"))
    first = answer.saga
    assert first.state == model.SAGA_STATE_COMPENSATING
    # The first step's command is still in flight: its reply is awaited before undoing it.
    assert [s.status for s in first.steps] == [
        model.STEP_STATUS_STARTED,
        model.STEP_STATUS_SKIPPED,
        model.STEP_STATUS_SKIPPED,
    ]
    again = (await stub.Compensate(api.CompensateRequest(id=saga_id))).saga
    assert again.state == model.SAGA_STATE_COMPENSATING

    history = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
    requested = [h for h in history.history if h.event == "compensation_requested"]
    assert len(requested) == 1 and requested[0].reason == "customer left"


async def test_same_idempotency_key_and_request_returns_the_original(
    stub: Stub, database_url: str
) -> None:
    started = await stub.StartSaga(order_request(idempotency_key="order-77"))
    replay = await stub.StartSaga(order_request(idempotency_key="order-77"))
    first, second = started.saga, replay.saga
    assert second.id == first.id
    assert (started.replayed, replay.replayed) == (False, True)
    assert second.idempotency_key == "order-77"
    assert len(await outbox_commands(database_url, first.id)) == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartSaga(order_request(idempotency_key="order-77", name="order.other"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.id in (err.value.details() or "")


async def test_concurrent_starts_with_one_key_make_one_saga(stub: Stub) -> None:
    import asyncio

    results = await asyncio.gather(
        *(stub.StartSaga(order_request(idempotency_key="race")) for _ in range(8))
    )
    assert len({r.saga.id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False] + [True] * 7


def _deep(levels: int) -> struct_pb2.Struct:
    obj: dict[str, Any] = {}
    node = obj
    for _ in range(levels):
        node["d"] = {}
        node = node["d"]
    return structs.to_struct(obj)


def _steps(n: int) -> list[api.StepSpec]:
    return [api.StepSpec(name=f"s{i}", action="a.b") for i in range(n)]


BAD_STARTS = {
    "missing name": (dict(name=""), "name"),
    "name too long": (dict(name="n" * 201), "name"),
    "no steps": (dict(steps=[]), "steps"),
    "too many steps": (dict(steps=_steps(101)), "steps"),
    "step without action": (dict(steps=[api.StepSpec(name="x")]), "steps[0].action"),
    "step without name": (dict(steps=[api.StepSpec(action="a.b")]), "steps[0].name"),
    "duplicate step names": (
        dict(steps=[api.StepSpec(name="x", action="a"), api.StepSpec(name="x", action="b")]),
        "steps[1].name",
    ),
    "wildcard action": (dict(steps=[api.StepSpec(name="x", action="orders.*")]), "steps[0].action"),
    "bad compensation": (
        dict(steps=[api.StepSpec(name="x", action="a", compensation="un do")]),
        "steps[0].compensation",
    ),
    "input too large": (
        dict(
            steps=[api.StepSpec(name="x", action="a", input=structs.to_struct({"b": "x" * 70000}))]
        ),
        "steps[0].input",
    ),
    "context nested too deep": (dict(context=_deep(21)), "context"),
    "request too large": (
        dict(
            steps=[
                api.StepSpec(name=f"s{i}", action="a", input=structs.to_struct({"b": "x" * 60000}))
                for i in range(20)
            ]
        ),
        "request",
    ),
    "idempotency key too long": (dict(idempotency_key="k" * 201), "idempotency_key"),
}


@pytest.mark.parametrize("case", list(BAD_STARTS), ids=list(BAD_STARTS))
async def test_bad_start_requests_name_the_field(stub: Stub, case: str) -> None:
    overrides, field = BAD_STARTS[case]
    request = order_request()
    for key, value in overrides.items():
        request.ClearField(key)
        if isinstance(value, list):
            getattr(request, key).extend(value)
        elif isinstance(value, struct_pb2.Struct):
            getattr(request, key).CopyFrom(value)
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartSaga(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}:")


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    tag, size, out = (number << 3) | 2, len(payload), bytearray()
    out.append(tag)
    while size > 0x7F:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + payload


def _nested_struct(depth: int) -> bytes:
    # Struct{fields: {"d": Value{struct_value: <depth - 1>}}}
    inner = _nested_struct(depth - 1) if depth > 1 else b""
    return _field(1, _field(1, b"d") + _field(2, _field(5, inner)))


async def test_json_nested_past_protobufs_own_limit_is_invalid_argument(
    coordinator: Coordinator,
) -> None:
    # The Python protobuf library refuses to build such a message, so send raw bytes.
    step = _field(1, b"x") + _field(2, b"a.b") + _field(4, _nested_struct(60))
    body = _field(1, b"order.place") + _field(2, step)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        call = channel.unary_unary("/sagaplane.v1.SagaCoordinatorService/StartSaga")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("request:")


async def test_other_bad_inputs_are_invalid_argument(stub: Stub) -> None:
    cases = [
        (stub.GetSaga(api.GetSagaRequest(id="")), "id:"),
        (stub.Compensate(api.CompensateRequest(id="")), "id:"),
        (stub.ListActive(api.ListActiveRequest(page_size=-1)), "page_size:"),
        (stub.ListActive(api.ListActiveRequest(page_token="garbage!")), "page_token:"),
    ]
    for call, prefix in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(prefix)


async def test_page_token_is_bound_to_its_filter(stub: Stub) -> None:
    for _ in range(3):
        await stub.StartSaga(order_request())
    page = await stub.ListActive(api.ListActiveRequest(page_size=1, name="order.place"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListActive(api.ListActiveRequest(page_token=page.next_page_token))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- transitions through the store, as the reply consumer will drive them ---


async def drive(coordinator: Coordinator, saga_id: str, outcomes: list[bool]) -> None:
    """Answer the saga's in-flight commands with ``outcomes``, one per command."""
    store = coordinator_store(coordinator)
    for succeeded in outcomes:
        saga, _ = await store.get(saga_id)
        step = next(
            s
            for s in saga.steps
            if s.status in (engine.StepStatus.STARTED, engine.StepStatus.COMPENSATING)
        )
        kind = (
            CommandKind.EXECUTE
            if step.status is engine.StepStatus.STARTED
            else CommandKind.COMPENSATE
        )
        attempt = step.attempts if kind is CommandKind.EXECUTE else step.compensation_attempts
        assert step.token is not None
        await store.apply(
            saga_id,
            engine.StepReplied(
                step_id=step.id,
                kind=kind,
                attempt=attempt,
                token=step.token,
                succeeded=succeeded,
                output={"done": step.name} if succeeded else None,
                error=None if succeeded else "boom",
                retryable=False,
            ),
        )


def coordinator_store(coordinator: Coordinator) -> SagaStore:
    store = coordinator.store
    assert store is not None
    return store


async def test_transitions_write_steps_history_and_commands(
    stub: Stub, coordinator: Coordinator, database_url: str
) -> None:
    saga_id = (await stub.StartSaga(order_request())).saga.id
    # create and reserve succeed, charge fails: reserve then create are compensated.
    await drive(coordinator, saga_id, [True, True, False, True, True])

    saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert saga.HasField("completed_at")
    assert [s.status for s in saga.steps] == [
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_FAILED,
    ]
    assert saga.steps[2].error == "boom"
    assert structs.to_dict(saga.steps[0].output) == {"done": "create"}
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

    commands = await outbox_commands(database_url, saga_id)
    assert [(c.action, c.kind) for c in commands] == [
        ("orders.create", messages_pb2.COMMAND_KIND_EXECUTE),
        ("inventory.reserve", messages_pb2.COMMAND_KIND_EXECUTE),
        ("payment.charge", messages_pb2.COMMAND_KIND_EXECUTE),
        ("inventory.release", messages_pb2.COMMAND_KIND_COMPENSATE),
        ("orders.delete", messages_pb2.COMMAND_KIND_COMPENSATE),
    ]
    # A compensation receives the output of the step it undoes.
    assert structs.to_dict(commands[4].output) == {"done": "create"}


async def test_compensate_on_completed_saga_undoes_every_step(
    stub: Stub, coordinator: Coordinator, database_url: str
) -> None:
    saga_id = (await stub.StartSaga(order_request())).saga.id
    await drive(coordinator, saga_id, [True, True, True])
    done = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
    assert done.state == model.SAGA_STATE_COMPLETED

    compensating = (await stub.Compensate(api.CompensateRequest(id=saga_id))).saga
    assert compensating.state == model.SAGA_STATE_COMPENSATING
    assert not compensating.HasField("completed_at")
    await drive(coordinator, saga_id, [True, True, True])

    saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
    assert saga.state == model.SAGA_STATE_COMPENSATED
    actions = [c.action for c in await outbox_commands(database_url, saga_id)][3:]
    assert actions == ["payment.refund", "inventory.release", "orders.delete"]


async def test_failed_compensation_needs_a_person(stub: Stub, coordinator: Coordinator) -> None:
    saga_id = (await stub.StartSaga(order_request())).saga.id
    await drive(coordinator, saga_id, [True, False, False])

    saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
    assert saga.state == model.SAGA_STATE_COMPENSATION_FAILED
    assert saga.steps[0].status == model.STEP_STATUS_COMPENSATION_FAILED
    assert saga_id in [s.id for s in (await stub.ListActive(api.ListActiveRequest())).sagas]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Compensate(api.CompensateRequest(id=saga_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_stale_reply_changes_nothing(stub: Stub, coordinator: Coordinator) -> None:
    saga = (await stub.StartSaga(order_request())).saga
    store = coordinator_store(coordinator)
    forged = engine.StepReplied(
        step_id=saga.steps[0].id,
        kind=CommandKind.EXECUTE,
        attempt=1,
        token="not-the-token",
        succeeded=True,
        output={},
    )
    transition = await store.apply(saga.id, forged)
    assert transition.ignored
    after = (await stub.GetSaga(api.GetSagaRequest(id=saga.id, include_history=True))).saga
    assert after.steps[0].status == model.STEP_STATUS_STARTED
    assert len(after.history) == 2
