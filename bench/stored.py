"""Stored sagas in bulk (SQL ``INSERT ... SELECT generate_series``), and the read RPCs timed
against them.

Synthetic saga ids are ``'0'`` followed by the zero-padded number: 26 characters of the
ULID alphabet that sort before every real ULID (older than any saga started live). All
stored sagas are ``completed`` with 3 completed steps and the standard 1 KB context,
except ``active`` of them, spread evenly over the whole id range (``started``, third step
in flight): the hardest case for ListActive without its partial index.
"""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta
from typing import Any

import psycopg

from bench.stats import summary_ms
from bench.workload import SAGA_NAME, make_context
from coordinator.engine import DEFAULT_STEP_TIMEOUT
from sagaplane import SagaClient

_SAGAS = """
INSERT INTO sagaplane_sagas (id, name, state, context, created_at, updated_at, completed_at)
SELECT '0' || lpad(g::text, 25, '0'), %(name)s, 'completed', %(context)s::jsonb,
       timestamptz '2024-01-01' + g * interval '10 ms',
       timestamptz '2024-01-01' + g * interval '10 ms' + interval '40 ms',
       timestamptz '2024-01-01' + g * interval '10 ms' + interval '40 ms'
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
"""

_STEPS = """
INSERT INTO sagaplane_steps
    (saga_id, position, id, name, action, compensation, input, output, status, attempts,
     compensation_attempts, executed_at, timeout_ms)
SELECT '0' || lpad(g::text, 25, '0'), p, '1' || lpad((g * 3 + p)::text, 25, '0'),
       (ARRAY['create', 'reserve', 'charge'])[p + 1],
       (ARRAY['orders.create', 'inventory.reserve', 'payment.charge'])[p + 1],
       (ARRAY['orders.cancel', 'inventory.release', 'payment.refund'])[p + 1],
       '{"sku": "bench-sku-1", "qty": 1}'::jsonb, '{"ok": true}'::jsonb, 'completed', 1, 0,
       timestamptz '2024-01-01' + g * interval '10 ms' + p * interval '10 ms',
       %(timeout_ms)s
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g, generate_series(0, 2) AS p
"""

_HISTORY = """
INSERT INTO sagaplane_history (saga_id, from_state, to_state, step_name, event, at)
SELECT '0' || lpad(g::text, 25, '0'), e.from_state, e.to_state, e.step_name, e.event,
       timestamptz '2024-01-01' + g * interval '10 ms'
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g,
     (VALUES (NULL, 'started', NULL, 'saga_started'),
             ('started', 'started', 'create', 'step_completed'),
             ('started', 'started', 'reserve', 'step_completed'),
             ('started', 'completed', 'charge', 'saga_completed'))
         AS e(from_state, to_state, step_name, event)
"""

_ACTIVE_RESET = """
UPDATE sagaplane_sagas SET state = 'completed', completed_at = updated_at
WHERE state = 'started' AND id < '1'
"""

_ACTIVE_SET = """
UPDATE sagaplane_sagas SET state = 'started', completed_at = NULL
WHERE id IN (SELECT '0' || lpad(g::text, 25, '0')
             FROM generate_series(%(every)s::bigint, %(hi)s::bigint, %(every)s::bigint) AS g)
"""


def stored_id(n: int) -> str:
    """The id of the ``n``-th synthetic saga."""
    return "0" + str(n).rjust(25, "0")


async def grow(
    database_url: str,
    *,
    have: int,
    want: int,
    active: int,
    chunk: int = 100_000,
    history: bool = True,
) -> dict[str, Any]:
    """Add synthetic sagas ``have+1..want`` (with steps and history) and spread ``active``
    active ones over ``1..want``; then VACUUM ANALYZE. Returns timings and sizes."""
    t0 = time.monotonic()
    context = json.dumps(make_context())
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        lo = have + 1
        while lo <= want:
            hi = min(want, lo + chunk - 1)
            params = {
                "lo": lo,
                "hi": hi,
                "name": SAGA_NAME,
                "context": context,
                "timeout_ms": DEFAULT_STEP_TIMEOUT // timedelta(milliseconds=1),
            }
            async with c.transaction():
                await c.execute(_SAGAS, params)
                await c.execute(_STEPS, params)
                if history:
                    await c.execute(_HISTORY, params)
            lo = hi + 1
        async with c.transaction():
            await c.execute(_ACTIVE_RESET)
            every = max(1, want // max(1, active))
            await c.execute(_ACTIVE_SET, {"every": every, "hi": want})
        generated_s = time.monotonic() - t0
        for table in ("sagaplane_sagas", "sagaplane_steps", "sagaplane_history"):
            await c.execute(f"VACUUM ANALYZE {table}")
        cur = await c.execute(
            "SELECT pg_database_size(current_database()), "
            "(SELECT count(*) FROM sagaplane_sagas WHERE state = 'started')"
        )
        row = await cur.fetchone()
    assert row is not None
    return {
        "generate_s": round(generated_s, 1),
        "vacuum_s": round(time.monotonic() - t0 - generated_s, 1),
        "database_mb": round(int(row[0]) / 2**20),
        "active": int(row[1]),
    }


RECENT = 10_000
"""GetSaga also reads among the newest this many sagas: a working set that stays cached,
as most reads of a live system do, beside the uniform (cold) case."""


async def time_reads(
    target: str, *, stored: int, get_calls: int, list_calls: int, seed: int = 6
) -> dict[str, Any]:
    """GetSaga on stored sagas picked uniformly (a cold read at 1M: the tables outgrow
    shared_buffers) and among the newest :data:`RECENT`; ListActive (first page, and a
    page further on); ListSagas filtered by state and name (the same two pages); one
    call at a time, timed at the client."""
    rng = random.Random(seed)
    get: list[float] = []
    recent: list[float] = []
    first_page: list[float] = []
    next_page: list[float] = []
    sagas_first: list[float] = []
    sagas_next: list[float] = []
    async with SagaClient(target, timeout=30) as client:
        for _ in range(20):  # warm the channel and the server's prepared statements
            await client.get_saga(stored_id(rng.randint(1, stored)))
            await client.list_active()
        for i in range(2 * get_calls):
            low = 1 if i % 2 == 0 else max(1, stored - RECENT + 1)
            saga_id = stored_id(rng.randint(low, stored))
            t = time.perf_counter()
            await client.get_saga(saga_id)
            (get if i % 2 == 0 else recent).append(time.perf_counter() - t)
        token = ""
        for i in range(list_calls):
            t = time.perf_counter()
            page = await client.list_active(page_token=token if i % 2 else "")
            (next_page if i % 2 else first_page).append(time.perf_counter() - t)
            token = page.next_page_token
        # ListSagas: a page filtered by state and name, among every saga stored (finished
        # ones too), first and further on; an index range scan per state, so its cost
        # should not grow with the table (0008_watch_and_search.sql).
        for _ in range(10):
            await client.list_sagas(states=["completed"], name=SAGA_NAME)
        token = ""
        for i in range(list_calls):
            t = time.perf_counter()
            page = await client.list_sagas(
                page_token=token if i % 2 else "", states=["completed"], name=SAGA_NAME
            )
            (sagas_next if i % 2 else sagas_first).append(time.perf_counter() - t)
            token = page.next_page_token
    return {
        "get_saga_ms": summary_ms(get),
        "get_saga_recent_ms": summary_ms(recent),
        "list_active_first_page_ms": summary_ms(first_page),
        "list_active_next_page_ms": summary_ms(next_page),
        "list_sagas_first_page_ms": summary_ms(sagas_first),
        "list_sagas_next_page_ms": summary_ms(sagas_next),
    }
