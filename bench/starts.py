"""``--phases starts``: the cost of starting sagas, one StartSaga call per saga against
StartSagas chunks, in the same run (see bench/README.md).

A coordinator of its own on a fresh database; no participant. The sagas are the
standard workload's, with actions of their own (``starts.orders.create``, ...) that
route to one sink queue nobody consumes, so that every first command is published
(and confirmed) but nothing comes back, and a one-hour step timeout, so that no timer
fires during the phase. Each way is timed from its first call until its last command
has been relayed (every outbox row marked sent): the start includes publishing the first
commands. The coordinator's CPU (the process, and apart from it its PostgreSQL backends)
is read over the same span.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import psycopg

from bench.infra import BackendMeter, Meter
from bench.workload import start_request
from sagaplane import SagaClient, topology
from sagaplane.testing import Child
from sagaplane.v1.coordinator_pb2 import StartSagaRequest

SINK_QUEUE = "bench.starts.sink"
ACTION_PREFIX = "starts."


def request() -> StartSagaRequest:
    """The standard saga, with actions only the sink queue takes, and a step timeout
    longer than the phase."""
    saga = start_request()
    for spec in saga.steps:
        spec.action = ACTION_PREFIX + spec.action
        spec.compensation = ACTION_PREFIX + spec.compensation
    saga.step_timeout.FromSeconds(3600)
    return saga


_UNSENT = "SELECT count(*) FROM sagaplane_outbox WHERE sent_at IS NULL AND parked_at IS NULL"


async def all_relayed(database_url: str, within: float = 120.0) -> float:
    """Until the outbox has nothing left to send; the monotonic time then. One
    connection for the whole wait: on a shared machine a connection every 10 ms may
    find PostgreSQL's every slot taken."""
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(_UNSENT)).fetchone()
            if not (row and row[0]):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"commands still unsent after {within:g}s")
            await asyncio.sleep(0.01)
    return time.monotonic()


async def _single(client: SagaClient, saga: StartSagaRequest, sagas: int, concurrency: int) -> None:
    left = iter(range(sagas))

    async def worker() -> None:
        for _ in left:
            await client.start_saga_request(saga)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, sagas))))


async def _batched(client: SagaClient, saga: StartSagaRequest, sagas: int, chunk: int) -> None:
    # One call at a time, as `sagaplane import` sends them.
    for first in range(0, sagas, chunk):
        await client.start_sagas([saga] * min(chunk, sagas - first))


async def measure(
    *,
    target: str,
    coordinator: Child,
    database_url: str,
    admin_url: str,
    database: str,
    amqp_url: str,
    sagas: int,
    chunk: int,
    concurrency: int,
) -> dict[str, Any]:
    """Both ways, one after the other; their figures and the ratios batch / single."""
    saga = request()
    connection = await aio_pika.connect(amqp_url)
    async with connection, SagaClient(target, timeout=120) as client:
        channel = await connection.channel()
        queue = await channel.declare_queue(SINK_QUEUE, durable=False)
        await queue.bind(topology.COMMANDS_EXCHANGE, ACTION_PREFIX + "#")
        # A few of each first, so that neither way pays for warming up.
        await _single(client, saga, 20, 10)
        await _batched(client, saga, 20, 20)
        await all_relayed(database_url)
        runs: dict[str, Any] = {}
        ways: dict[str, Callable[[], Awaitable[object]]] = {
            "single": lambda: _single(client, saga, sagas, concurrency),
            "batch": lambda: _batched(client, saga, sagas, chunk),
        }
        for way, work in ways.items():
            meter = Meter({"coordinator": coordinator.pid})
            backends = BackendMeter(admin_url, [database])
            await backends.start()
            meter.start()
            began = time.monotonic()
            await work()
            answered = time.monotonic()
            relayed = await all_relayed(database_url)
            used = await meter.stop()
            postgres = sum((await backends.stop()).values())
            cpu = used["processes"]["coordinator"]["cpu_s"]
            runs[way] = {
                "sagas": sagas,
                "calls": sagas if way == "single" else -(-sagas // chunk),
                "answered_s": round(answered - began, 3),
                "relayed_s": round(relayed - began, 3),
                "sagas_per_s": round(sagas / (answered - began), 1),
                "coordinator_cpu_ms_per_saga": round(1000 * cpu / sagas, 3),
                "postgres_cpu_ms_per_saga": round(1000 * postgres / sagas, 3),
                "machine_busy_pct": used["machine_busy_pct"],
            }
        await queue.delete(if_unused=False, if_empty=False)
    single, batch = runs["single"], runs["batch"]
    return {
        **runs,
        "chunk": chunk,
        "concurrency": concurrency,
        "ratio": {
            key: round(batch[key] / single[key], 3) if single[key] else None
            for key in ("sagas_per_s", "coordinator_cpu_ms_per_saga", "postgres_cpu_ms_per_saga")
        },
    }
