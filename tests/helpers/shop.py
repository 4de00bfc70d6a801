"""A running demo shop for end-to-end tests: four participants, each with its own
database, on the test's vhost. The tables have no unique constraints, so a
duplicated effect shows up as a second row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from examples.shop.services import (
    BUILDERS,
    SERVICES,
    create_tables,
    line_order_steps,
    order_context,
    order_steps,
)
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import StepSpec, structs
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

TERMINAL = {
    model.SAGA_STATE_COMPLETED,
    model.SAGA_STATE_FAILED,
    model.SAGA_STATE_COMPENSATED,
    model.SAGA_STATE_COMPENSATION_FAILED,
}


@dataclass
class Shop:
    """The participants' databases, and queries over what they did."""

    amqp_url: str
    database_urls: dict[str, str] = field(default_factory=dict)

    async def rows(self, service: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.database_urls[service]) as conn:
            cur = await conn.execute(query.encode(), params or None)
            return await cur.fetchall()

    async def effects(self, saga_id: str | None = None) -> list[tuple[str, str, Any]]:
        """Every effect of every service as (saga_id, action, at), oldest first."""
        found: list[tuple[str, str, Any]] = []
        for service in SERVICES:
            where = " WHERE saga_id = %s" if saga_id else ""
            params = (saga_id,) if saga_id else ()
            found += await self.rows(
                service, "SELECT saga_id, action, at FROM shop_effects" + where, *params
            )  # type: ignore[arg-type]
        return sorted(found, key=lambda e: e[2])

    async def unsend_outboxes(self) -> None:
        """Make every participant's relay publish all its replies again."""
        for service in SERVICES:
            await self.rows_exec(service, "UPDATE sagaplane_outbox SET sent_at = NULL")

    async def rows_exec(self, service: str, statement: str) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_urls[service]) as conn:
            await conn.execute(statement.encode())
            await conn.commit()


@pytest.fixture
async def shop_databases(amqp_url: str) -> AsyncIterator[Shop]:
    """Fresh participant databases with the shop's tables (participants not running)."""
    shop = Shop(amqp_url=amqp_url)
    names = {service: unique_name(f"sagaplane_{service}") for service in SERVICES}
    try:
        for service, name in names.items():
            await create_database(name)
            shop.database_urls[service] = server_url(name)
            await create_tables(service, shop.database_urls[service])
        yield shop
    finally:
        for name in names.values():
            await drop_database(name)


@pytest.fixture
async def shop(shop_databases: Shop) -> AsyncIterator[Shop]:
    """The demo participants running in this process."""
    async with AsyncExitStack() as stack:
        for service in SERVICES:
            participant = BUILDERS[service](
                shop_databases.amqp_url, shop_databases.database_urls[service]
            )
            await stack.enter_async_context(participant)
        yield shop_databases


def order_request(*, amount: float = 42, qty: int = 1) -> api.StartSagaRequest:
    """The shop's order as three steps in a line: create, reserve, charge."""
    return api.StartSagaRequest(
        name="order.place",
        steps=[_spec(s) for s in line_order_steps(qty=qty, amount=amount)],
        context=structs.to_struct({"customer": "c-1"}),
    )


def graph_order_request(
    *, amount: float = 42, qty: int = 1, gift: bool = False
) -> api.StartSagaRequest:
    """The shop's order saga: create, then reserve beside validate_address, gift_wrap
    when the context says so, then charge (see examples/shop/services.py)."""
    return api.StartSagaRequest(
        name="order.place",
        steps=[_spec(s) for s in order_steps(qty=qty, amount=amount)],
        context=structs.to_struct(order_context(customer="c-1", gift=gift)),
    )


def _spec(step: dict[str, Any]) -> api.StepSpec:
    return StepSpec(**step).to_proto()


async def wait_terminal(
    stub: coordinator_pb2_grpc.SagaCoordinatorServiceStub,
    saga_ids: Sequence[str],
    *,
    timeout: float = 60.0,
    history: bool = False,
) -> dict[str, model.Saga]:
    """Poll until every saga is terminal; fail the test with the laggards otherwise."""
    deadline = time.monotonic() + timeout
    done: dict[str, model.Saga] = {}
    while True:
        for saga_id in saga_ids:
            if saga_id in done:
                continue
            saga = (
                await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=history))
            ).saga
            if saga.state in TERMINAL:
                done[saga_id] = saga
        if len(done) == len(saga_ids):
            return done
        if time.monotonic() > deadline:
            pending = [s for s in saga_ids if s not in done]
            pytest.fail(f"{len(pending)} sagas not terminal after {timeout}s: {pending[:5]}")
        await asyncio.sleep(0.05)


async def settle(seconds: float = 1.5) -> None:
    """Give redelivered duplicates time to arrive (they must change nothing)."""
    await asyncio.sleep(seconds)
