"""StartSagas against a real coordinator, a real channel, PostgreSQL and RabbitMQ: many
sagas in one transaction, all or none, with every bad saga named by its index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from coordinator.app import Coordinator
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import (
    IdempotencyConflict,
    InvalidArgument,
    Participant,
    SagaClient,
    StepContext,
    saga_request,
    structs,
)
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub

ROWS = """
SELECT (SELECT count(*) FROM sagaplane_sagas), (SELECT count(*) FROM sagaplane_steps),
       (SELECT count(*) FROM sagaplane_history), (SELECT count(*) FROM sagaplane_outbox)
"""


def order(row: int, **overrides: Any) -> api.StartSagaRequest:
    """A two-step saga carrying its row number."""
    request = saga_request(
        "order.import",
        [
            {
                "name": "create",
                "action": "batch.create",
                "compensation": "batch.delete",
                "input": {"row": row},
            },
            {"name": "notify", "action": "batch.notify"},
        ],
        context={"row": row},
    )
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


async def rows(database_url: str) -> tuple[int, ...]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(ROWS)
        found = await cur.fetchone()
        assert found is not None
        return tuple(found)


def violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations of a refused call, read as any gRPC
    client reads them (the grpc-status-details-bin trailer)."""
    status = rpc_status.from_call(exc)
    assert status is not None, "no rich status in the trailers"
    found = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found += [(v.field, v.description) for v in bad.field_violations]
    return found


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[SagaClient]:
    async with SagaClient(f"127.0.0.1:{coordinator.port}", timeout=60) as c:
        yield c


@pytest.fixture
async def participant(amqp_url: str) -> AsyncIterator[Participant]:
    """Handles both steps of :func:`order`, so that started sagas complete."""
    name = unique_name("sagaplane_batch")
    await create_database(name)
    p = Participant("batch", amqp_url=amqp_url, database_url=server_url(name), prefetch=64)

    @p.step("batch.create")
    async def create(ctx: StepContext) -> dict[str, Any]:
        return {"created": ctx.input["row"]}

    @p.step("batch.notify")
    async def notify(ctx: StepContext) -> None:
        pass

    @p.compensation("batch.delete")
    async def delete(ctx: StepContext) -> None:
        pass

    async with p:
        yield p
    await drop_database(name)


async def test_a_thousand_sagas_start_in_one_commit_and_all_complete(
    stub: Stub, database_url: str, participant: Participant
) -> None:
    response = await stub.StartSagas(api.StartSagasRequest(sagas=[order(i) for i in range(1000)]))

    assert [structs.to_dict(s.context)["row"] for s in response.sagas] == list(range(1000))
    assert all(s.state == model.SAGA_STATE_STARTED for s in response.sagas)
    assert len({s.id for s in response.sagas}) == 1000
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        # History rows are never updated, so their xmin is still the id of the transaction
        # that wrote them: each saga's start and its first dispatch, all in one.
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT xmin::text) FROM sagaplane_history"
            " WHERE event = 'saga_started' OR (event = 'step_dispatched' AND step_name = 'create')"
        )
        assert await cur.fetchone() == (2000, 1)
    deadline = time.monotonic() + 90
    while True:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE state = 'completed'), count(*) FROM sagaplane_sagas"
            )
            completed, total = await cur.fetchone() or (0, 0)
        if completed == 1000:
            break
        assert time.monotonic() < deadline, f"only {completed} of {total} sagas completed"
        await asyncio.sleep(0.2)
    got = (await stub.GetSaga(api.GetSagaRequest(id=response.sagas[617].id))).saga
    assert structs.to_dict(got.steps[0].output) == {"created": 617}


async def test_one_bad_saga_writes_nothing_and_is_named_by_its_index(
    stub: Stub, client: SagaClient, database_url: str
) -> None:
    sagas = [order(i) for i in range(1000)]
    sagas[617].steps[0].action = ""
    before = await rows(database_url)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "sagas[617].steps[0].action: is required"
    assert violations(raised.value) == [("sagas[617].steps[0].action", "is required")]
    assert await rows(database_url) == before

    # The Python SDK gives the same, as a structured attribute.
    with pytest.raises(InvalidArgument) as refused:
        await client.start_sagas(sagas)
    [violation] = refused.value.violations
    assert (violation.index, violation.field, violation.description) == (
        617,
        "sagas[617].steps[0].action",
        "is required",
    )
    assert await rows(database_url) == before


async def test_every_bad_saga_is_named_with_its_own_first_bad_field(
    stub: Stub, database_url: str
) -> None:
    sagas = [order(i) for i in range(20)]
    sagas[3].name = ""
    sagas[11].steps[1].name = "create"
    sagas[19].context.update({"price": float("nan")})
    before = await rows(database_url)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))

    expected = [
        ("sagas[3].name", "is required"),
        ("sagas[11].steps[1].name", "duplicate step name 'create'"),
        ("sagas[19].context.price", "is not a finite number"),
    ]
    assert violations(raised.value) == expected
    assert raised.value.details() == "; ".join(f"{f}: {p}" for f, p in expected)
    assert await rows(database_url) == before


async def test_a_thousand_bad_sagas_fit_in_the_answer_and_say_how_many_are_left_out(
    client: SagaClient, database_url: str
) -> None:
    before = await rows(database_url)
    with pytest.raises(InvalidArgument) as refused:
        await client.start_sagas([order(i, name="") for i in range(1000)])

    listed = refused.value.violations
    assert 20 < len(listed) < 1000
    assert [v.index for v in listed[:-1]] == list(range(len(listed) - 1))
    assert listed[-1].field == "sagas" and listed[-1].index is None
    assert f"and {1000 - len(listed) + 1} more" in listed[-1].description
    assert "more" in refused.value.message and len(refused.value.message) < 1200
    assert await rows(database_url) == before


async def test_a_key_used_for_another_request_fails_the_call_naming_its_index(
    stub: Stub, client: SagaClient, database_url: str
) -> None:
    earlier = (await stub.StartSaga(order(0, idempotency_key="order-7"))).saga
    sagas = [order(i, idempotency_key=f"order-{i + 100}") for i in range(10)]
    sagas[6] = order(6, idempotency_key="order-7")  # another row than the one started
    before = await rows(database_url)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))

    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    details = raised.value.details() or ""
    assert details.startswith("sagas[6].idempotency_key: 'order-7' was already used")
    assert earlier.id in details
    assert [field for field, _ in violations(raised.value)] == ["sagas[6].idempotency_key"]
    assert await rows(database_url) == before

    with pytest.raises(IdempotencyConflict) as conflict:
        await client.start_sagas(sagas)
    assert [v.index for v in conflict.value.violations] == [6]
    assert await rows(database_url) == before


async def test_replayed_keys_return_the_original_sagas_in_their_positions(
    stub: Stub, client: SagaClient, database_url: str
) -> None:
    single = await client.start_saga_request(order(2, idempotency_key="k-2"))
    sagas = [order(i, idempotency_key=f"k-{i}") for i in range(5)]
    sagas.append(order(5))  # no key: a new saga every time

    first = await client.start_sagas(sagas)
    assert first[2].id == single.id  # started by StartSaga, replayed by StartSagas
    assert first.replayed == {2}
    assert await rows(database_url) == (6, 12, 12, 6)

    again = await client.start_sagas(sagas)
    assert [s.id for s in again[:5]] == [s.id for s in first[:5]]
    assert again[5].id != first[5].id
    assert again.replayed == {0, 1, 2, 3, 4}
    assert [s.context["row"] for s in again] == list(range(6))
    assert await rows(database_url) == (7, 14, 14, 7)


async def test_a_key_twice_in_one_call(stub: Stub, database_url: str) -> None:
    same = [order(0, idempotency_key="twice"), order(1), order(0, idempotency_key="twice")]
    response = await stub.StartSagas(api.StartSagasRequest(sagas=same))
    assert response.sagas[0].id == response.sagas[2].id != response.sagas[1].id
    assert list(response.replayed) == [2]
    assert await rows(database_url) == (2, 4, 4, 2)

    different = [order(0, idempotency_key="again"), order(1, idempotency_key="again")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=different))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "sagas[1].idempotency_key: is also sagas[0]'s, for a different request"
    )
    assert await rows(database_url) == (2, 4, 4, 2)


async def test_batches_sharing_keys_in_opposite_orders_do_not_deadlock(stub: Stub) -> None:
    sagas = [order(i, idempotency_key=f"shared-{i}") for i in range(200)]
    forward = api.StartSagasRequest(sagas=sagas)
    backward = api.StartSagasRequest(sagas=list(reversed(sagas)))
    results = await asyncio.gather(*(stub.StartSagas(r) for r in [forward, backward] * 3))
    ids = [s.id for s in results[0].sagas]
    for n, result in enumerate(results):
        got = [s.id for s in result.sagas]
        assert got == (ids if n % 2 == 0 else list(reversed(ids)))


LIMITS = {
    "no sagas": ([], "sagas: at least one saga is required"),
    "too many sagas": ([order(0)] * 1001, "sagas: at most 1000 sagas are allowed in one call"),
    "request too large": (
        [
            order(i, context=structs.to_struct({"pad": "x" * 30_000}))
            for i in range(80)  # 2.4 MB
        ],
        "request: is larger than 2097152 bytes; send fewer sagas",
    ),
    "one saga too large": (
        [
            order(0),
            saga_request(
                "big",
                [{"name": f"s{i}", "action": "a", "input": {"b": "x" * 60_000}} for i in range(20)],
            ),
        ],
        "sagas[1]: is larger than 1048576 bytes",
    ),
}


@pytest.mark.parametrize("case", list(LIMITS), ids=list(LIMITS))
async def test_limits_have_clear_errors_and_write_nothing(
    stub: Stub, database_url: str, case: str
) -> None:
    sagas, message = LIMITS[case]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message
    assert await rows(database_url) == (0, 0, 0, 0)


async def test_an_answer_too_large_for_a_client_is_refused_before_anything_is_written(
    stub: Stub, database_url: str
) -> None:
    # Tiny steps make a small request (0.4 MB) but a large answer (3.8 MB): every step comes
    # back with its id, status, policies and timeout.
    steps = [api.StepSpec(name=f"s{i}", action="a") for i in range(100)]
    sagas = [api.StartSagaRequest(name="wide", steps=steps) for _ in range(400)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("sagas: the answer (every saga as recorded)")
    assert "send fewer sagas per call" in (raised.value.details() or "")
    assert await rows(database_url) == (0, 0, 0, 0)


async def test_a_batch_far_past_the_limit_is_refused_by_grpc_itself(
    stub: Stub, database_url: str
) -> None:
    sagas = [order(i, context=structs.to_struct({"pad": "x" * 50_000})) for i in range(100)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartSagas(api.StartSagasRequest(sagas=sagas))  # 5 MB
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await rows(database_url) == (0, 0, 0, 0)
