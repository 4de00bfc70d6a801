"""Prometheus metrics, scraped over real HTTP from a running coordinator and participant:
each figure moves by exactly what the sagas did, labels stay bounded, and with metrics
off no port is opened."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import Coordinator
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from helpers.shop import TERMINAL
from sagaplane import NonRetryableError, Participant, RetryableError, StepContext, topology
from sagaplane.durations import to_duration
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FAST_RETRY = model.RetryPolicy(
    max_attempts=2, initial_interval=to_duration(0.05), max_interval=to_duration(0.05)
)


def scrape(port: int) -> Samples:
    """GET /metrics over HTTP, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def ascrape(port: int) -> Samples:
    return await asyncio.to_thread(scrape, port)


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Stack:
    stub: Stub
    coordinator: Coordinator
    participant: Participant

    async def coordinator_metrics(self) -> Samples:
        assert self.coordinator.metrics_port is not None
        return await ascrape(self.coordinator.metrics_port)

    async def participant_metrics(self) -> Samples:
        assert self.participant.metrics_port is not None
        return await ascrape(self.participant.metrics_port)


@pytest.fixture
async def stack(database_url: str, amqp_url: str) -> AsyncIterator[Stack]:
    """A coordinator and a participant, both serving metrics on a free port."""
    name = unique_name("sagaplane_metrics")
    await create_database(name)
    p = Participant(
        "metrics",
        amqp_url=amqp_url,
        database_url=server_url(name),
        metrics_listen="127.0.0.1:0",
        relay_poll_interval=0.05,
    )

    @p.step("metrics.ok")
    async def ok(ctx: StepContext) -> dict[str, Any]:
        return {"done": True}

    @p.step("metrics.once")
    async def once(ctx: StepContext) -> None:
        if ctx.attempt == 1:
            raise RetryableError("busy, try again")

    @p.step("metrics.fail")
    async def fail(ctx: StepContext) -> None:
        raise NonRetryableError("card declined")

    @p.compensation("metrics.undo")
    async def undo(ctx: StepContext) -> None:
        pass

    @p.compensation("metrics.undo_broken")
    async def undo_broken(ctx: StepContext) -> None:
        raise NonRetryableError("the ledger is closed")

    settings = coordinator_settings(
        database_url, amqp_url, timer_interval=0.05, metrics_listen="127.0.0.1:0"
    )
    async with (
        Coordinator(settings) as coordinator,
        p,
        grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel,
    ):
        yield Stack(coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel), coordinator, p)
    await drop_database(name)


def step(name: str, action: str, compensation: str = "", **kw: Any) -> api.StepSpec:
    return api.StepSpec(name=name, action=action, compensation=compensation, **kw)


async def run_saga(stub: Stub, request: api.StartSagaRequest) -> model.Saga:
    saga_id = (await stub.StartSaga(request)).saga.id
    async with asyncio.timeout(30):
        while True:
            saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
            if saga.state in TERMINAL:
                return saga
            await asyncio.sleep(0.05)


async def settled(
    read: Callable[[], Any], check: Callable[[Samples], None], timeout: float = 10.0
) -> Samples:
    """Scrape until ``check`` passes (a reply is counted just after its commit, so the
    last count may land a moment after the saga shows its state); its last error else."""
    async with asyncio.timeout(timeout):
        while True:
            samples: Samples = await read()
            try:
                check(samples)
                return samples
            except AssertionError:
                await asyncio.sleep(0.05)


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every counter and histogram sample that changed, by how much (gauges and the
    process collectors' figures left out)."""
    kept = ("_total", "_count")
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0].startswith("sagaplane_")
        and key[0].endswith(kept)
        and after[key] != before.get(key, 0.0)
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


ATTEMPT = "sagaplane_step_attempt_duration_seconds_count"
HANDLER = "sagaplane_handler_duration_seconds_count"


def grpc_calls(samples: Samples, method: str) -> dict[str, float]:
    return {
        dict(labels)["code"]: value
        for (name, labels), value in samples.items()
        if name == "sagaplane_grpc_requests_total" and dict(labels)["method"] == method
    }


async def test_each_figure_moves_by_exactly_what_the_sagas_did(stack: Stack) -> None:
    c0, p0 = await stack.coordinator_metrics(), await stack.participant_metrics()
    assert get(c0, "process_resident_memory_bytes") > 0  # the client's process collector
    assert get(p0, "process_resident_memory_bytes") > 0

    # 1. completed, with one retry: ok, then once (fails retryably on attempt 1).
    saga = await run_saga(
        stack.stub,
        api.StartSagaRequest(
            name="order",
            steps=[step("a", "metrics.ok", "metrics.undo"), step("b", "metrics.once")],
            retry_policy=FAST_RETRY,
        ),
    )
    assert saga.state == model.SAGA_STATE_COMPLETED
    want_c1 = {
        key("sagaplane_sagas_started_total", saga="order"): 1,
        key("sagaplane_sagas_ended_total", saga="order", state="completed"): 1,
        key("sagaplane_saga_duration_seconds_count", saga="order", state="completed"): 1,
        key(ATTEMPT, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key(ATTEMPT, action="metrics.once", kind="execute", outcome="failed"): 1,
        key(ATTEMPT, action="metrics.once", kind="execute", outcome="succeeded"): 1,
        key("sagaplane_step_retries_total", action="metrics.once", kind="execute"): 1,
        key("sagaplane_replies_applied_total"): 3,
    }
    c1 = await settled(
        stack.coordinator_metrics, lambda s: _same(_without_batches(moved(c0, s)), want_c1)
    )
    # However the three replies were batched, each was in exactly one batch.
    assert (
        get(c1, "sagaplane_reply_batch_size_sum") - get(c0, "sagaplane_reply_batch_size_sum") == 3
    )
    assert grpc_calls(c1, "StartSaga") == {"OK": 1}
    assert grpc_calls(c1, "GetSaga")["OK"] >= 1
    assert get(c1, "sagaplane_sagas_active", saga="order", state="started") == 0
    want_p1 = {
        key(
            "sagaplane_commands_total", action="metrics.ok", kind="execute", outcome="succeeded"
        ): 1,
        key(HANDLER, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key("sagaplane_commands_total", action="metrics.once", kind="execute", outcome="failed"): 1,
        key(HANDLER, action="metrics.once", kind="execute", outcome="failed"): 1,
        key(
            "sagaplane_commands_total", action="metrics.once", kind="execute", outcome="succeeded"
        ): 1,
        key(HANDLER, action="metrics.once", kind="execute", outcome="succeeded"): 1,
    }
    p1 = await settled(stack.participant_metrics, lambda s: _same(moved(p0, s), want_p1))

    # 2. compensated: ok, then fail (non-retryable); ok's undo runs.
    saga = await run_saga(
        stack.stub,
        api.StartSagaRequest(
            name="order",
            steps=[step("a", "metrics.ok", "metrics.undo"), step("b", "metrics.fail")],
        ),
    )
    assert saga.state == model.SAGA_STATE_COMPENSATED
    want_c2 = {
        key("sagaplane_sagas_started_total", saga="order"): 1,
        key("sagaplane_sagas_ended_total", saga="order", state="compensated"): 1,
        key("sagaplane_saga_duration_seconds_count", saga="order", state="compensated"): 1,
        key(ATTEMPT, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key(ATTEMPT, action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(ATTEMPT, action="metrics.undo", kind="compensate", outcome="succeeded"): 1,
        key("sagaplane_replies_applied_total"): 3,
    }
    c2 = await settled(
        stack.coordinator_metrics, lambda s: _same(_without_batches(moved(c1, s)), want_c2)
    )
    want_p2 = {
        key(
            "sagaplane_commands_total", action="metrics.ok", kind="execute", outcome="succeeded"
        ): 1,
        key(HANDLER, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key("sagaplane_commands_total", action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(HANDLER, action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(
            "sagaplane_commands_total",
            action="metrics.undo",
            kind="compensate",
            outcome="succeeded",
        ): 1,
        key(HANDLER, action="metrics.undo", kind="compensate", outcome="succeeded"): 1,
    }
    p2 = await settled(stack.participant_metrics, lambda s: _same(moved(p1, s), want_p2))

    # 3. compensation_failed: ok, then fail; ok's undo fails for good. It waits.
    saga = await run_saga(
        stack.stub,
        api.StartSagaRequest(
            name="refund",
            steps=[step("a", "metrics.ok", "metrics.undo_broken"), step("b", "metrics.fail")],
        ),
    )
    assert saga.state == model.SAGA_STATE_COMPENSATION_FAILED
    want_c3 = {
        key("sagaplane_sagas_started_total", saga="refund"): 1,
        key("sagaplane_sagas_ended_total", saga="refund", state="compensation_failed"): 1,
        key("sagaplane_saga_duration_seconds_count", saga="refund", state="compensation_failed"): 1,
        key(ATTEMPT, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key(ATTEMPT, action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(ATTEMPT, action="metrics.undo_broken", kind="compensate", outcome="failed"): 1,
        key("sagaplane_replies_applied_total"): 3,
    }
    c3 = await settled(
        stack.coordinator_metrics, lambda s: _same(_without_batches(moved(c2, s)), want_c3)
    )
    # The gauges, read from the database at the scrape: one saga waits for a person.
    assert get(c3, "sagaplane_sagas_active", saga="refund", state="compensation_failed") == 1
    assert (
        get(
            c3,
            "sagaplane_active_saga_oldest_age_seconds",
            saga="refund",
            state="compensation_failed",
        )
        > 0
    )
    assert {k for k, v in c3.items() if k[0] == "sagaplane_sagas_active" and v} == {
        key("sagaplane_sagas_active", saga="refund", state="compensation_failed")
    }
    assert get(c3, "sagaplane_outbox_parked") == 0
    assert get(c3, "sagaplane_replies_stale_total") == 0
    want_p3 = {
        key(
            "sagaplane_commands_total", action="metrics.ok", kind="execute", outcome="succeeded"
        ): 1,
        key(HANDLER, action="metrics.ok", kind="execute", outcome="succeeded"): 1,
        key("sagaplane_commands_total", action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(HANDLER, action="metrics.fail", kind="execute", outcome="failed"): 1,
        key(
            "sagaplane_commands_total",
            action="metrics.undo_broken",
            kind="compensate",
            outcome="failed",
        ): 1,
        key(HANDLER, action="metrics.undo_broken", kind="compensate", outcome="failed"): 1,
    }
    await settled(stack.participant_metrics, lambda s: _same(moved(p2, s), want_p3))
    # Every reply went out: the participant's outbox is empty, nothing parked.
    p3 = await settled(
        stack.participant_metrics,
        lambda s: _same({"b": get(s, "sagaplane_outbox_backlog")}, {"b": 0}),
    )
    assert get(p3, "sagaplane_outbox_parked") == 0

    # A refusal is counted with its status code.
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.stub.StartSaga(api.StartSagaRequest(name="", steps=[]))
    c4 = await stack.coordinator_metrics()
    assert grpc_calls(c4, "StartSaga") == {"OK": 3, "INVALID_ARGUMENT": 1}


async def test_a_duplicate_command_is_a_replay_and_a_late_reply_is_stale(
    stack: Stack, amqp_url: str
) -> None:
    saga = await run_saga(
        stack.stub, api.StartSagaRequest(name="order", steps=[step("a", "metrics.ok")])
    )
    c0, p0 = await stack.coordinator_metrics(), await stack.participant_metrics()
    # The broker delivers the step's command a second time (as after a lost ack): the
    # inbox answers it without running the handler, and the coordinator ignores the
    # copy of the reply.
    command = await _command_of(stack, saga.id)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(command, routing_key="metrics.ok")
    await settled(
        stack.participant_metrics,
        lambda s: _same(
            moved(p0, s),
            {
                key(
                    "sagaplane_commands_total",
                    action="metrics.ok",
                    kind="execute",
                    outcome="replayed",
                ): 1
            },
        ),
    )
    await settled(
        stack.coordinator_metrics,
        lambda s: _same(_without_batches(moved(c0, s)), {key("sagaplane_replies_stale_total"): 1}),
    )


async def _command_of(stack: Stack, saga_id: str) -> aio_pika.Message:
    """The step command the coordinator sent, as it left its outbox."""
    assert stack.coordinator.store is not None
    pool = stack.coordinator.store._pool  # the test reads the outbox row itself
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT body, message_id, message_type FROM sagaplane_outbox"
            " WHERE correlation_id = %s ORDER BY id LIMIT 1",
            (saga_id,),
        )
        row = await cur.fetchone()
    assert row is not None
    return aio_pika.Message(bytes(row[0]), message_id=row[1], type=row[2])


async def test_distinct_saga_ids_make_no_new_series(stack: Stack) -> None:
    await run_saga(stack.stub, api.StartSagaRequest(name="order", steps=[step("a", "metrics.ok")]))
    first = await stack.coordinator_metrics()
    first_p = await stack.participant_metrics()
    n = 1000  # the figure
    sagas = [
        api.StartSagaRequest(
            name="order",
            steps=[step("a", "metrics.ok")],
            idempotency_key=f"order-{i}",
        )
        for i in range(n)
    ]
    for chunk in range(0, n, 100):
        await stack.stub.StartSagas(api.StartSagasRequest(sagas=sagas[chunk : chunk + 100]))
    done = key("sagaplane_sagas_ended_total", saga="order", state="completed")
    last = await settled(
        stack.coordinator_metrics, lambda s: _same({0: s[done] - first[done]}, {0: n}), timeout=120
    )
    last_p = await stack.participant_metrics()
    # The one series that may appear: the active gauge of this saga name while some of
    # them ran (a scrape above saw them); 0 now.
    active = key("sagaplane_sagas_active", saga="order", state="started")
    assert _series(last) - _series(first) <= {active}
    assert get(last, "sagaplane_sagas_active", saga="order", state="started") == 0
    assert _series(last_p) == _series(first_p)
    values = {v for k in {*last, *last_p} for _, v in k[1]}
    assert not any(v.startswith("order-") or len(v) == 26 for v in values)  # keys, ULIDs


def _series(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    # The gRPC counter gains a series for StartSagas, the first call of that method.
    return {k for k in samples if k[0].startswith("sagaplane_") and "StartSagas" not in str(k)}


def _without_batches(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    # How replies were batched depends on timing; the batches' sum is checked instead.
    # The timer loop's rounds go on whatever the sagas do (their own test below).
    return {
        k: v
        for k, v in found.items()
        if not k[0].startswith(
            ("sagaplane_reply_batch_size", "sagaplane_grpc_requests", "sagaplane_timer_round")
        )
    }


def _same(found: dict[Any, float], want: dict[Any, float]) -> None:
    assert found == want


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (/proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_the_timer_loops_rounds_are_timed(stack: Stack) -> None:
    # The stack's timer loop runs every 50 ms: about 20 rounds in a second, each a
    # short query (nothing is due), never as long as the interval between them.
    before = await stack.coordinator_metrics()
    await asyncio.sleep(1.0)
    after = await stack.coordinator_metrics()
    rounds = get(after, "sagaplane_timer_round_seconds_count") - get(
        before, "sagaplane_timer_round_seconds_count"
    )
    took = get(after, "sagaplane_timer_round_seconds_sum") - get(
        before, "sagaplane_timer_round_seconds_sum"
    )
    assert 5 <= rounds <= 25
    assert 0 < took / rounds < 0.05


async def test_with_metrics_off_no_port_is_opened(database_url: str, amqp_url: str) -> None:
    name = unique_name("sagaplane_nometrics")
    await create_database(name)
    p = Participant("quiet", amqp_url=amqp_url, database_url=server_url(name))

    @p.step("quiet.ok")
    async def ok(ctx: StepContext) -> None:
        pass

    before = _listening_ports()
    settings = coordinator_settings(database_url, amqp_url, pool_size=2)
    try:
        async with Coordinator(settings) as coordinator, p:
            assert coordinator.metrics_port is None and p.metrics_port is None
            assert _listening_ports() - before == {coordinator.port}  # gRPC only
    finally:
        await drop_database(name)


async def test_only_get_metrics_is_served(stack: Stack) -> None:
    port = stack.coordinator.metrics_port
    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/other", None, 5)
    assert caught.value.code == 404
