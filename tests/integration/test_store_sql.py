"""The store's SQL against a real database: one definition of the active states, the
queries that must stay cheap still use their partial indexes, and steps stored before
0005 (a default policy as NULL) keep the policies they were started with."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from conftest import create_database, drop_database, server_url, unique_name
from psycopg import ClientCursor

from coordinator.api import validation
from coordinator.engine import ACTIVE_STATES, RetryPolicy, SagaState
from coordinator.messaging.codec import encode_command
from coordinator.store.migrate import coordinator_migrations
from coordinator.store.pool import open_pool
from coordinator.store.queries import q
from coordinator.store.repository import SagaStore
from sagaplane import migrations
from sagaplane.v1 import coordinator_pb2 as api

ACTIVE_INDEXES = {"sagaplane_sagas_active", "sagaplane_sagas_active_by_name"}


def _connect(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url, autocommit=True, cursor_factory=ClientCursor)


def test_the_database_and_the_engine_agree_on_the_active_states(database_url: str) -> None:
    with _connect(database_url) as conn:
        for state in SagaState:
            row = conn.execute("SELECT sagaplane_saga_is_active(%s)", (state.value,)).fetchone()
            assert row is not None and row[0] is (state in ACTIVE_STATES), state
        for index in sorted(ACTIVE_INDEXES):
            row = conn.execute(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
                " WHERE indexrelid = %s::regclass",
                (index,),
            ).fetchone()
            assert row is not None
            assert set(re.findall(r"'(\w+)'", row[0])) == {s.value for s in ACTIVE_STATES}


@pytest.mark.parametrize(
    ("query", "params", "indexes"),
    [
        # Either partial index of the active sagas proves the condition matched theirs.
        ("list_active", {"after": "~", "name": None}, ACTIVE_INDEXES),
        ("list_active_by_name", {"after": "~", "name": "order"}, ACTIVE_INDEXES),
        # The metrics' gauges, read at every scrape: never a scan of every saga stored.
        ("metrics_active_sagas", {}, ACTIVE_INDEXES),
        ("due_step_timers", {}, {"sagaplane_steps_deadline"}),
        ("due_saga_deadlines", {}, {"sagaplane_sagas_deadline"}),
    ],
)
def test_the_cheap_queries_use_their_partial_indexes(
    database_url: str, query: str, params: dict[str, Any], indexes: set[str]
) -> None:
    params = params | {"limit": 50, "stale_for": timedelta(0)}
    with _connect(database_url) as conn:
        # With sequential scans priced out, a plan shows which indexes the query can use.
        conn.execute("SET enable_seqscan = off")
        cur = conn.cursor()
        text = cur.mogrify(q(query), params)
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {text}".encode()))
    used = set(re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\w+)", plan))
    used |= set(re.findall(r"Bitmap Index Scan on (\w+)", plan))
    assert used & indexes, plan


THEN = RetryPolicy(
    max_attempts=3,
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    max_interval=timedelta(seconds=60),
)
"""The default retry policy up to 0.1, which a NULL stands for."""
THEN_COMPENSATION = replace(THEN, max_attempts=10)
AS_BEFORE_0005 = "UPDATE sagaplane_steps SET retry_policy = NULL, compensation_retry_policy = NULL"
"""What the previous version wrote for a default policy."""


async def test_policies_stored_as_null_are_the_defaults_they_stood_for() -> None:
    name = unique_name("sagaplane_nulls")
    await create_database(name)
    url = server_url(name)
    everything = coordinator_migrations()
    backfill = [m for m in everything if m.name == "stored_retry_policies"]
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await migrations.apply(conn, [m for m in everything if m not in backfill])
        async with await open_pool(url, size=1) as pool:
            store = SagaStore(pool, encode_command)
            request = api.StartSagaRequest(name="x", steps=[api.StepSpec(name="a", action="x.y")])
            ids = [
                (await store.start(spec, request=validation.canonical(request))).saga.id
                for spec in [validation.start_request(request)] * 2
            ]
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(AS_BEFORE_0005)
                assert await migrations.apply(conn, everything) == backfill
                cur = await conn.execute(
                    "SELECT count(*) FROM sagaplane_steps"
                    " WHERE retry_policy IS NULL OR compensation_retry_policy IS NULL"
                )
                assert await cur.fetchone() == (0,)
                # A replica of the previous version writes NULL during a rolling upgrade.
                await conn.execute(f"{AS_BEFORE_0005} WHERE saga_id = %s".encode(), (ids[1],))
            for saga_id in ids:
                saga, _ = await store.get(saga_id)
                (step,) = saga.steps
                assert (step.retry, step.compensation_retry) == (THEN, THEN_COMPENSATION)
    finally:
        await drop_database(name)
