"""ListSagas against a real coordinator and PostgreSQL: every saga, finished ones too,
newest first, filtered, keyset-paginated, and each page read from an index."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from coordinator import engine
from coordinator.app import Coordinator
from coordinator.store.queries import q
from helpers.cli import exit_status
from helpers.transitions import STEPS, request, succeed
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub


async def everything(stub: Stub, page_size: int, **filters: object) -> list[model.Saga]:
    """Every page of a filtered listing, followed to its end."""
    sagas: list[model.Saga] = []
    token = ""
    while True:
        page = await stub.ListSagas(
            api.ListSagasRequest(page_size=page_size, page_token=token, **filters)  # type: ignore[arg-type]
        )
        assert len(page.sagas) <= page_size
        sagas += page.sagas
        token = page.next_page_token
        if not token:
            return sagas


@pytest.fixture
async def sagas(stub: Stub, coordinator: Coordinator) -> dict[str, list[str]]:
    """Seven sagas: orders (2 completed, 1 compensating, 1 started) and refunds (1
    completed, 2 started), by state. Ids newest last."""
    assert coordinator.store is not None
    made: dict[str, list[str]] = {}
    plan = [
        ("order.place", "completed"),
        ("refund.issue", "started"),
        ("order.place", "completed"),
        ("order.place", "compensating"),
        ("refund.issue", "completed"),
        ("order.place", "started"),
        ("refund.issue", "started"),
    ]
    for i, (name, state) in enumerate(plan):
        start = request(name)
        start.idempotency_key = f"key-{i}"
        saga_id = (await stub.StartSaga(start)).saga.id
        if state == "completed":
            for _ in STEPS:
                await succeed(coordinator.store, saga_id)
        elif state == "compensating":
            await succeed(coordinator.store, saga_id)
            await coordinator.store.apply(saga_id, engine.CompensateRequested(reason="test"))
        made.setdefault(state, []).append(saga_id)
        made.setdefault(name, []).append(saga_id)
        made.setdefault("all", []).append(saga_id)
    return made


async def test_every_saga_finished_ones_too_newest_first_page_by_page(
    stub: Stub, sagas: dict[str, list[str]]
) -> None:
    listed = await everything(stub, 2)
    assert [s.id for s in listed] == sagas["all"][::-1]
    created = [(s.created_at.ToDatetime(), s.id) for s in listed]
    assert created == sorted(created, reverse=True)
    assert {s.state for s in listed} >= {model.SAGA_STATE_COMPLETED, model.SAGA_STATE_STARTED}
    assert all(len(s.steps) == 3 and not s.history for s in listed)


async def test_filters_by_state_name_key_and_id(stub: Stub, sagas: dict[str, list[str]]) -> None:
    finished = await everything(stub, 1, states=[model.SAGA_STATE_COMPLETED])
    assert [s.id for s in finished] == sagas["completed"][::-1]
    active = await everything(
        stub, 2, states=[model.SAGA_STATE_STARTED, model.SAGA_STATE_COMPENSATING]
    )
    assert [s.id for s in active] == sorted(sagas["started"] + sagas["compensating"])[::-1]
    orders_done = await everything(stub, 1, states=[model.SAGA_STATE_COMPLETED], name="order.place")
    assert [s.id for s in orders_done] == [
        i for i in sagas["completed"][::-1] if i in sagas["order.place"]
    ]
    assert [s.id for s in await everything(stub, 5, name="refund.issue")] == sagas["refund.issue"][
        ::-1
    ]
    assert [s.id for s in await everything(stub, 5, idempotency_key="key-3")] == [sagas["all"][3]]
    assert [s.id for s in await everything(stub, 5, id=sagas["all"][4])] == [sagas["all"][4]]
    assert await everything(stub, 5, id="not-an-id") == []
    assert await everything(stub, 5, idempotency_key="key-3", name="refund.issue") == []


async def test_filters_by_created_time(stub: Stub, sagas: dict[str, list[str]]) -> None:
    listed = await everything(stub, 50)
    middle = listed[3].created_at  # the fourth newest
    since = await everything(stub, 2, created_after=middle)
    assert [s.id for s in since] == [s.id for s in listed[:4]]
    before = await everything(stub, 2, created_before=middle)
    assert [s.id for s in before] == [s.id for s in listed[4:]]
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    assert await everything(stub, 2, created_after=future) == []


async def test_a_page_token_holds_for_its_own_filters_only(
    stub: Stub, sagas: dict[str, list[str]]
) -> None:
    page = await stub.ListSagas(api.ListSagasRequest(page_size=1, name="order.place"))
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSagas(
            api.ListSagasRequest(page_size=1, name="refund.issue", page_token=page.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "page_token: was issued for different filters"
    active = await stub.ListActive(api.ListActiveRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSagas(api.ListSagasRequest(page_size=1, page_token=active.next_page_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("page_token:")


def _time(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (api.ListSagasRequest(states=[0]), "states[0]: must be a saga state"),
        (api.ListSagasRequest(states=[1, 77]), "states[1]: must be a saga state"),
        (api.ListSagasRequest(page_size=-1), "page_size: must not be negative"),
        (api.ListSagasRequest(name="a\x00b"), "name: must not contain a NUL character"),
        (api.ListSagasRequest(name="n" * 201), "name: is longer than 200 characters"),
        (api.ListSagasRequest(id="x" * 201), "id: is longer than 200 characters"),
        (api.ListSagasRequest(idempotency_key="\x00"), "idempotency_key: must not contain"),
        (api.ListSagasRequest(created_after=_time(-(10**12))), "created_after: must be between"),
        (api.ListSagasRequest(created_before=_time(10**12)), "created_before: must be between"),
        (api.ListSagasRequest(created_after=_time(0, -1)), "created_after: has nanos"),
        (
            api.ListSagasRequest(created_after=_time(100), created_before=_time(100)),
            "created_before: must be later than created_after",
        ),
        (api.ListSagasRequest(page_token="garbage!"), "page_token: is not a token returned by"),
    ],
)
async def test_bad_filters_are_invalid_argument_naming_the_field(
    stub: Stub, bad: api.ListSagasRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSagas(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(message), caught.value.details()


async def test_a_page_is_an_index_range_scan_per_state_that_stops_after_one_page(
    database_url: str,
) -> None:
    """With 30,000 stored sagas, a filtered page reads at most a page per state from
    the indexes of migration 0008 (no sequential scan, no sort of the table's rows):
    its cost does not grow with the number of sagas stored."""
    states = [s.value for s in engine.SagaState]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO sagaplane_sagas (id, name, state, context, created_at, updated_at)"
            " SELECT lpad(i::text, 26, '0'), 'n' || (i %% 20), (%s::text[])[1 + i %% 6], '{}',"
            "        now() - i * interval '1 second', now()"
            " FROM generate_series(1, 30000) AS i",
            (states,),
        )
        await conn.execute("ANALYZE sagaplane_sagas")
        cur = psycopg.AsyncClientCursor(conn)
        # A page token carries its saga's created_at (or, from an older version, not).
        cases = [
            ({"states": ["completed", "failed"], "name": None}, "sagaplane_sagas_by_state"),
            ({"states": states, "name": "n7"}, "sagaplane_sagas_by_state_name"),
        ]
        for (filters, index), after_created in itertools.product(
            cases, [None, datetime.now(UTC) - timedelta(seconds=15000)]
        ):
            params = {
                "limit": 51,
                "after": "00000000000000000000015000",
                "after_created": after_created,
                "created_after": datetime.now(UTC) - timedelta(days=30),
                "created_before": None,
                "id": None,
                "idempotency_key": None,
                **filters,
            }
            text = cur.mogrify(q("list_sagas"), params)
            await cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {text}".encode())
            row = await cur.fetchone()
            assert row is not None
            plan = json.dumps(row[0])
            scans = [
                node
                for node in _nodes(row[0][0]["Plan"])
                if node.get("Relation Name") == "sagaplane_sagas" and "Index Name" in node
            ]
            assert "Seq Scan" not in plan, plan
            by_state = [n for n in scans if n["Index Name"] == index]
            assert by_state, plan
            for node in by_state:
                assert node["Node Type"] == "Index Scan" and node["Scan Direction"] == "Backward"
                # One page per state at most, however many rows match further down.
                assert node["Actual Rows"] <= 51, plan
            # The only sort is of the pages merged: at most a page per state.
            for node in _nodes(row[0][0]["Plan"]):
                if node["Node Type"] == "Sort":
                    merged = node["Plans"][0]  # type: ignore[index]
                    assert merged["Actual Rows"] <= 51 * len(filters["states"]), plan
                    assert "Index Cond" in json.dumps(merged)


def _nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    found = [plan]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        found += _nodes(child)
    return found


async def test_the_cli_lists_every_saga_with_all_state_and_since(
    coordinator: Coordinator, sagas: dict[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--coordinator", f"127.0.0.1:{coordinator.port}", "--json"]

    async def listed(*flags: str) -> list[str]:
        status = await asyncio.to_thread(exit_status, ["list", *flags, *target])
        out = capsys.readouterr().out
        assert status == 0, out
        return [s["id"] for s in json.loads(out)]

    assert await listed("--all") == sagas["all"][::-1]
    assert await listed("--all", "--limit", "2") == sagas["all"][::-1][:2]
    assert await listed("--state", "completed") == sagas["completed"][::-1]
    both = await listed("--state", "completed", "--state", "compensating", "--name", "order.place")
    done_or_undoing = set(sagas["completed"] + sagas["compensating"]) & set(sagas["order.place"])
    assert both == [i for i in sagas["all"][::-1] if i in done_or_undoing]
    assert len(both) == 3
    assert await listed("--since", "1h") == sagas["all"][::-1]
    # Without them, as before: active sagas only.
    active = set(sagas["started"] + sagas["compensating"])
    assert await listed() == [i for i in sagas["all"][::-1] if i in active]
    refused = await asyncio.to_thread(exit_status, ["list", "--all", "--stale-for", "1h", *target])
    assert refused == 2
    assert "--stale-for lists active sagas only" in capsys.readouterr().err
