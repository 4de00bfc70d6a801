"""Sagas whose steps form a graph, for real: gRPC, PostgreSQL, RabbitMQ, a participant.

Every handler records when its transaction ran (the database clock, at its start and
after a short sleep), so that the tests can show two branches in flight at once, a
join that waits for both, and compensations in reverse dependency order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import psycopg
import pytest
from psycopg.types.json import Jsonb

from coordinator.app import Coordinator
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import NonRetryableError, Participant, SagaClient, StepContext, StepSpec
from sagaplane.errors import InvalidArgument
from sagaplane.sagas import RetryPolicy
from sagaplane.v1 import coordinator_pb2

EFFECTS = """
CREATE TABLE graph_effects (
    saga_id text NOT NULL, step text NOT NULL, kind text NOT NULL,
    started_at timestamptz NOT NULL, ended_at timestamptz NOT NULL,
    input jsonb NOT NULL, results jsonb NOT NULL
)"""

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture
async def graph_db() -> AsyncIterator[str]:
    name = unique_name("sagaplane_graph")
    await create_database(name)
    async with await psycopg.AsyncConnection.connect(server_url(name), autocommit=True) as c:
        await c.execute(EFFECTS)
    yield server_url(name)
    await drop_database(name)


async def _effect(ctx: StepContext) -> None:
    # Long enough that two branches dispatched together visibly overlap.
    await ctx.tx.execute(
        "INSERT INTO graph_effects"
        " VALUES (%s, %s, %s, clock_timestamp(), clock_timestamp(), %s, %s)",
        (ctx.saga_id, ctx.step_name, ctx.kind.value, Jsonb(ctx.input), Jsonb(dict(ctx.results))),
    )
    await ctx.tx.execute("SELECT pg_sleep(%s)", (float(ctx.input.get("sleep", 0.3)),))
    await ctx.tx.execute(
        "UPDATE graph_effects SET ended_at = clock_timestamp()"
        " WHERE saga_id = %s AND step = %s AND kind = %s",
        (ctx.saga_id, ctx.step_name, ctx.kind.value),
    )


@pytest.fixture
async def graph_participant(
    coordinator: Coordinator, amqp_url: str, graph_db: str
) -> AsyncIterator[Participant]:
    participant = Participant("graph", amqp_url=amqp_url, database_url=graph_db)

    @participant.step("graph.do")
    async def do(ctx: StepContext) -> dict[str, Any]:
        await _effect(ctx)
        if ctx.input.get("fail"):
            raise NonRetryableError(f"{ctx.step_name} refuses")
        returns: dict[str, Any] = ctx.input.get("returns", {"done": ctx.step_name})
        return returns

    @participant.compensation("graph.undo")
    async def undo(ctx: StepContext) -> None:
        await _effect(ctx)

    async with participant:
        yield participant


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[SagaClient]:
    async with SagaClient(f"127.0.0.1:{coordinator.port}") as client:
        yield client


def step(
    name: str, *depends_on: str, root: bool = False, when: str | None = None, **input: Any
) -> StepSpec:
    return StepSpec(
        name,
        "graph.do",
        "graph.undo",
        input,
        retry_policy=ONCE,
        depends_on=() if root else (depends_on or None),
        when=when,
    )


async def effects(url: str, saga_id: str) -> dict[tuple[str, str], tuple[datetime, datetime]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT step, kind, started_at, ended_at FROM graph_effects WHERE saga_id = %s",
            (saga_id,),
        )
        rows = await cur.fetchall()
    found = {(s, k): (a, b) for s, k, a, b in rows}
    assert len(found) == len(rows), "each step ran (and was undone) at most once"
    return found


def overlap(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


async def test_independent_steps_run_at_the_same_time_and_a_join_waits_for_both(
    client: SagaClient, graph_participant: Participant, graph_db: str
) -> None:
    started = await client.start_saga(
        "graph.order",
        [
            step("create"),
            step("reserve", "create"),
            step("address", "create"),
            step("charge", "reserve", "address"),
        ],
    )
    assert [s.depends_on for s in started.steps] == [
        (),
        ("create",),
        ("create",),
        ("reserve", "address"),
    ]
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "completed"
    ran = await effects(graph_db, saga.id)
    create, reserve, address, charge = (
        ran[(n, "execute")] for n in ("create", "reserve", "address", "charge")
    )
    # The two branches' transactions overlapped: they were in flight together.
    assert overlap(reserve, address), (reserve, address)
    assert create[1] <= min(reserve[0], address[0])
    assert charge[0] >= max(reserve[1], address[1])


async def test_a_failing_branch_waits_for_the_other_then_both_and_the_root_are_undone(
    client: SagaClient, graph_participant: Participant, graph_db: str
) -> None:
    started = await client.start_saga(
        "graph.order",
        [
            step("create"),
            step("reserve", "create", sleep=1.0),
            step("address", "create", fail=True, sleep=0.1),
            step("charge", "reserve", "address"),
        ],
    )
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "compensated"
    statuses = {s.name: s.status for s in saga.steps}
    assert statuses == {
        "create": "compensated",
        "reserve": "compensated",
        "address": "failed",
        "charge": "skipped",
    }
    ran = await effects(graph_db, saga.id)
    assert ("charge", "execute") not in ran
    assert ("address", "compensate") not in ran  # it failed without taking effect
    # The branch in flight was awaited, undone, and only then its root.
    assert ran[("reserve", "compensate")][0] >= ran[("reserve", "execute")][1]
    assert ran[("create", "compensate")][0] >= ran[("reserve", "compensate")][1]


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([step("a"), step("b", "x")], 'steps[1].depends_on[0]: no step named "x"'),
        ([step("a"), step("b", "b")], "steps[1].depends_on[0]: a step cannot depend on itself"),
        ([step("a"), step("b", "a", "a")], 'steps[1].depends_on[1]: "a" is given twice'),
        (
            [step("a", "b"), step("b", "a")],
            "steps: the dependencies form a cycle (each needs the next): a -> b -> a",
        ),
        ([step("a"), step("b", "")], "steps[1].depends_on[0]: is required"),
        (
            [step("a"), step("b", when="context.gift ==")],
            "steps[1].when: is not a CEL expression: Failed to parse expression",
        ),
        (
            [step("a", root=True), step("b", root=True, when="steps.a.output.ok")],
            'steps[1].when: steps.a: "a" is not a step this one depends on',
        ),
        (
            [step("a", root=True), step("b", root=True, v="${steps.a.output.x}")],
            'steps[1].input.v: ${steps.a.output.x}: "a" is not a step this one depends on '
            "(directly or not), so its output may not exist yet",
        ),
    ],
)
async def test_bad_dependencies_are_invalid_argument_naming_the_field_and_write_nothing(
    client: SagaClient, database_url: str, steps: list[StepSpec], message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await client.start_saga("graph.bad", steps)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.message.startswith(f"INVALID_ARGUMENT: {message}"), refused.value.message
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM sagaplane_sagas")
        assert await cur.fetchone() == (0,)


async def test_depends_on_nothing_with_names_is_refused(client: SagaClient) -> None:
    request = coordinator_pb2.StartSagaRequest(
        name="graph.bad",
        steps=[
            coordinator_pb2.StepSpec(name="a", action="graph.do"),
            coordinator_pb2.StepSpec(
                name="b", action="graph.do", depends_on=["a"], depends_on_nothing=True
            ),
        ],
    )
    with pytest.raises(InvalidArgument) as refused:
        await client.start_saga_request(request)
    assert "steps[1].depends_on_nothing: must not be set together with depends_on" in str(
        refused.value
    )


async def test_a_graph_saga_survives_a_reload_from_the_database(
    client: SagaClient, graph_participant: Participant
) -> None:
    # Two roots: both start at once; the join's dependencies come back from the rows.
    started = await client.start_saga(
        "graph.roots",
        [step("left", root=True), step("right", root=True), step("join", "left", "right")],
    )
    assert {s.name for s in started.steps if s.status == "started"} == {"left", "right"}
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "completed"
    assert saga.step("join").depends_on == ("left", "right")


async def inputs_and_results(url: str, saga_id: str) -> dict[str, tuple[Any, Any]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT step, input, results FROM graph_effects WHERE saga_id = %s AND kind = %s",
            (saga_id, "execute"),
        )
        return {name: (given, results) for name, given, results in await cur.fetchall()}


async def test_a_later_step_gets_an_earlier_ones_output_by_reference_and_in_its_results(
    client: SagaClient, graph_participant: Participant, graph_db: str
) -> None:
    started = await client.start_saga(
        "graph.order",
        [
            step("create", returns={"order_id": 17, "ref": "o-17"}, sleep=0),
            step("reserve", sleep=0),
            step(
                "charge",
                sleep=0,
                order_id="${steps.create.output.order_id}",
                ref="${steps.create.output.ref}",
                customer="${context.customer}",
            ),
        ],
        context={"customer": "c-9"},
    )
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "completed"
    seen = await inputs_and_results(graph_db, saga.id)
    given, results = seen["charge"]
    # As a number and as a string, as create returned them.
    assert given == {"sleep": 0, "order_id": 17, "ref": "o-17", "customer": "c-9"}
    assert results == {"create": {"order_id": 17, "ref": "o-17"}, "reserve": {"done": "reserve"}}
    assert seen["reserve"][1] == {"create": {"order_id": 17, "ref": "o-17"}}
    # GetSaga shows the input as it was sent, and the history records it.
    shown = await client.get_saga(saga.id, include_history=True)
    assert shown.step("charge").input == given
    assert any(
        h.event == "step_dispatched" and h.step_name == "charge" and '"order_id":17' in h.reason
        for h in shown.history
    )


async def test_a_reference_to_a_missing_value_fails_the_step_and_compensates_the_rest(
    client: SagaClient, graph_participant: Participant, graph_db: str
) -> None:
    started = await client.start_saga(
        "graph.order",
        [
            step("create", returns={"order_id": 17}, sleep=0),
            step("charge", sleep=0, order_id="${steps.create.output.order.id}"),
        ],
    )
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "compensated"
    charge = saga.step("charge")
    assert charge.status == "failed" and charge.attempts == 0
    assert charge.error == (
        'input.order_id: ${steps.create.output.order.id}: the output of "create" has no order'
    )
    assert "charge" not in await inputs_and_results(graph_db, saga.id)


async def test_a_step_whose_condition_is_false_is_skipped_and_the_join_still_runs(
    client: SagaClient, graph_participant: Participant, graph_db: str
) -> None:
    started = await client.start_saga(
        "graph.order",
        [
            step("create", sleep=0),
            step("gift_wrap", "create", when="context.gift == true", sleep=0),
            step("ship", "create", sleep=0),
            step("charge", "gift_wrap", "ship", when="steps.create.output.done == 'create'"),
        ],
        context={"gift": False},
    )
    saga = await client.wait(started.id, timeout=30)
    assert saga.state == "completed"
    assert {s.name: s.status for s in saga.steps} == {
        "create": "completed",
        "gift_wrap": "skipped",
        "ship": "completed",
        "charge": "completed",
    }
    assert saga.step("gift_wrap").when == "context.gift == true"
    ran = await inputs_and_results(graph_db, saga.id)
    assert "gift_wrap" not in ran and set(ran) == {"create", "ship", "charge"}
