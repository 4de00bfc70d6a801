"""Retention against a real coordinator and PostgreSQL: finished sagas deleted once
expired, with their steps and history, by replicas sharing the work; active sagas and
their idempotency keys untouched; sent outbox rows deleted after their window;
``sagaplane prune --dry-run`` saying what would go."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest

from coordinator.app import Coordinator
from coordinator.messaging.codec import encode_command
from coordinator.retention import Pool, Pruner, Retention, Totals
from coordinator.store.pool import open_pool
from coordinator.store.queries import q
from coordinator.store.repository import SagaStore, rule_params
from helpers.cli import exit_status
from helpers.participants import participant_database, participants
from helpers.transitions import STEPS, request, succeed
from sagaplane import Participant, StepContext
from sagaplane.errors import ConfigurationError
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub

FINISHED = 100_000
ACTIVE = 1_000
RULES = Retention(
    sagas=timedelta(days=30), sagas_by_name={"payments": timedelta(days=365)}, outbox=None
)

# Synthetic sagas g = 1..FINISHED, finished: every tenth is a "payments" saga (kept 365
# days), the others "order.place" (kept 30 days). States cycle through the three final
# ones. Ends: g % 4 == 0 one day ago (kept), 1 and 2 forty days ago (kept only for
# payments), 3 four hundred days ago (expired for every name). Each has 2 steps, 3
# history entries and an idempotency key. Ids start with '00': older than any real ULID ('01...').
_FINISHED = """
INSERT INTO sagaplane_sagas
    (id, name, state, context, idempotency_key, created_at, updated_at, completed_at)
SELECT '0' || lpad(g::text, 25, '0'),
       CASE WHEN g %% 10 = 0 THEN 'payments' ELSE 'order.place' END,
       (ARRAY['completed', 'failed', 'compensated'])[g %% 3 + 1],
       '{}'::jsonb, 'synthetic-' || g, e - interval '1 minute', e, e
FROM generate_series(1, %(n)s) AS g,
     LATERAL (SELECT now() - CASE g %% 4 WHEN 0 THEN interval '1 day'
                                        WHEN 3 THEN interval '400 days'
                                        ELSE interval '40 days' END AS e) AS ends
"""

# Active sagas g = n+1..n+ACTIVE, started two years ago, in the three active states;
# the compensation_failed ones even carry an old completed_at: still never deleted.
_ACTIVE = """
INSERT INTO sagaplane_sagas
    (id, name, state, context, idempotency_key, created_at, updated_at, completed_at)
SELECT '0' || lpad(g::text, 25, '0'), 'order.place',
       (ARRAY['started', 'compensating', 'compensation_failed'])[g %% 3 + 1],
       '{}'::jsonb, 'synthetic-' || g, now() - interval '2 years',
       now() - interval '2 years',
       CASE WHEN g %% 3 = 2 THEN now() - interval '400 days' END
FROM generate_series(%(n)s + 1, %(n)s + %(active)s) AS g
"""

_STEPS = """
INSERT INTO sagaplane_steps (saga_id, position, id, name, action, input, status, timeout_ms)
SELECT s.id, p, '1' || substr(s.id, 2, 24) || p, 'step' || p, 'shop.step' || p, '{}'::jsonb,
       'completed', 30000
FROM sagaplane_sagas s, generate_series(0, 1) AS p WHERE s.id < '01'
"""

_HISTORY = """
INSERT INTO sagaplane_history (saga_id, from_state, to_state, event)
SELECT s.id, 'started', s.state, e.event
FROM sagaplane_sagas s,
     (VALUES ('saga_started'), ('step_completed'), ('saga_ended')) AS e (event)
WHERE s.id < '01'
"""


# Backends of this database waiting for a lock: what they wait on, what they run, what
# their blockers run, and whether a pruner's statement is among them.
_LOCK_WAITS = """
SELECT w.wait_event, w.query, coalesce(b.queries, ''),
       (w.query || coalesce(b.queries, '')) ~ 'sagaplane_saga_is_finished|DELETE FROM sagaplane_'
FROM pg_stat_activity w
LEFT JOIN LATERAL (
    SELECT string_agg(p.query, ' | ') AS queries FROM pg_stat_activity p
    WHERE p.pid = ANY(pg_blocking_pids(w.pid))
) AS b ON true
WHERE w.datname = current_database() AND w.wait_event_type = 'Lock'
"""


def synthetic_id(g: int) -> str:
    return "0" + str(g).rjust(25, "0")


def describe(latencies: list[float]) -> str:
    ms = sorted(t * 1000 for t in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{len(ms)} calls, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
        f"max {ms[-1]:.1f} ms"
    )


def expired(g: int) -> bool:
    """Whether the synthetic finished saga ``g`` is past its name's retention."""
    days = {0: 1, 1: 40, 2: 40, 3: 400}[g % 4]
    return days > (365 if g % 10 == 0 else 30)


async def counts(conn: psycopg.AsyncConnection) -> dict[str, int]:
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM sagaplane_sagas), (SELECT count(*) FROM sagaplane_steps),"
        " (SELECT count(*) FROM sagaplane_history),"
        " (SELECT count(*) FROM sagaplane_sagas WHERE state IN"
        "   ('started', 'compensating', 'compensation_failed'))"
    )
    row = await cur.fetchone()
    assert row is not None
    return dict(zip(("sagas", "steps", "history", "active"), row, strict=True))


async def finish(stub: Stub, coordinator: Coordinator, key: str, ended_ago: str) -> str:
    """A real saga, started with ``key`` and run to completed, ended ``ended_ago``."""
    assert coordinator.store is not None
    start = request("order.place")
    start.idempotency_key = key
    saga_id = (await stub.StartSaga(start)).saga.id
    for _ in STEPS:
        await succeed(coordinator.store, saga_id)
    async with await psycopg.AsyncConnection.connect(
        coordinator.settings.database_url, autocommit=True
    ) as conn:
        await conn.execute(
            "UPDATE sagaplane_sagas SET completed_at = now() - %s::interval WHERE id = %s",
            (ended_ago, saga_id),
        )
    return saga_id


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[Pool]]:
    """Two pools of their own, as two coordinator replicas have."""
    made = [await open_pool(database_url, size=2) for _ in range(2)]
    try:
        yield made
    finally:
        for pool in made:
            await pool.close()


def replicas(pools: list[Pool], rules: Retention = RULES) -> list[Pruner]:
    """A pruner on each pool: two coordinator replicas' retention."""
    return [Pruner(SagaStore(pool, encode_command), pool, rules) for pool in pools]


async def test_two_replicas_prune_exactly_the_expired_sagas_and_leave_active_ones_alone(
    stub: Stub, coordinator: Coordinator, pools: list[Pool]
) -> None:
    pruners = replicas(pools)
    # Real sagas, for what a client sees: one still running, one finished long ago, one
    # finished yesterday, each with an idempotency key.
    running = request("order.place")
    running.idempotency_key = "live"
    live = (await stub.StartSaga(running)).saga.id
    old = await finish(stub, coordinator, "old", "40 days")
    fresh = await finish(stub, coordinator, "fresh", "1 day")

    async with await psycopg.AsyncConnection.connect(
        coordinator.settings.database_url, autocommit=True
    ) as conn:
        t0 = time.monotonic()
        async with conn.transaction():
            # Watchers are told of every history insert (0008): 100,000 notifications
            # nobody listens to would make most of the fill's time.
            await conn.execute("ALTER TABLE sagaplane_history DISABLE TRIGGER USER")
            await conn.execute(_FINISHED, {"n": FINISHED})
            await conn.execute(_ACTIVE, {"n": FINISHED, "active": ACTIVE})
            await conn.execute(_STEPS)
            await conn.execute(_HISTORY)
            await conn.execute("ALTER TABLE sagaplane_history ENABLE TRIGGER USER")
        await conn.execute("ANALYZE sagaplane_sagas")
        # A batch reads the index of finished sagas, never the whole table.
        cur = psycopg.AsyncClientCursor(conn)
        claim = cur.mogrify(
            q("prune_claim_sagas"), rule_params(RULES.sagas, RULES.sagas_by_name, 1000)
        )
        plan = "\n".join(
            row[0] for row in await (await conn.execute(f"EXPLAIN {claim}")).fetchall()
        )
        assert "sagaplane_sagas_finished" in plan and "Seq Scan" not in plan, plan
        print(
            f"\nfilled {FINISHED} finished and {ACTIVE} active sagas in "
            f"{time.monotonic() - t0:.1f}s"
        )
        before = await counts(conn)
        doomed = sum(expired(g) for g in range(1, FINISHED + 1)) + 1  # + old
        cur = await conn.execute(
            "SELECT count(*) FROM sagaplane_history WHERE saga_id = %s", (old,)
        )
        [old_history] = await cur.fetchone() or (0,)
        print(f"before: {before}; expired: {doomed}")

        # StartSaga, one call at a time: 200 calls alone, then for as long as the two
        # replicas prune.
        latencies: list[float] = []
        pruning = True

        async def start_sagas(calls: int | None = None) -> None:
            while pruning and (calls is None or len(latencies) < calls):
                t = time.perf_counter()
                await stub.StartSaga(request("order.place"))
                latencies.append(time.perf_counter() - t)

        await start_sagas(200)
        print(f"StartSaga alone: {describe(latencies)}")
        baseline = len(latencies)
        latencies.clear()
        # Meanwhile, who in this database waits for a lock, and for whom. Transitions
        # may wait for each other's NOTIFY at commit (PostgreSQL serialises those); nobody
        # may wait for a pruner, nor a pruner for anybody.
        waits: list[tuple[str, str, str, bool]] = []
        looks = 0

        async def watch_locks() -> None:
            nonlocal looks
            async with await psycopg.AsyncConnection.connect(
                coordinator.settings.database_url, autocommit=True
            ) as watcher:
                while pruning:
                    cur = await watcher.execute(_LOCK_WAITS)
                    waits.extend(await cur.fetchall())
                    looks += 1
                    await asyncio.sleep(0.02)

        starter = asyncio.create_task(start_sagas())
        watcher = asyncio.create_task(watch_locks())
        t0 = time.monotonic()
        passes: list[Totals] = await asyncio.gather(*(r.run_pass() for r in pruners))
        pruned_s = time.monotonic() - t0
        pruning = False
        await starter
        await watcher
        after = await counts(conn)
        started = len(latencies) + baseline
        print(
            f"pruned in {pruned_s:.1f}s: replica A {passes[0]}, replica B {passes[1]}\n"
            f"StartSaga during the prune: {describe(latencies)}\n"
            f"lock waits seen in {looks} looks at pg_stat_activity: {len(waits)} "
            f"({', '.join(sorted({w[0] for w in waits}))}), "
            f"{sum(w[3] for w in waits)} of them on or by a pruner\nafter: {after}"
        )
        assert [w for w in waits if w[3]] == []

        # Each expired saga deleted once, by one replica or the other; both took a share.
        assert passes[0].sagas + passes[1].sagas == doomed
        assert passes[0].sagas > 0 and passes[1].sagas > 0
        assert sum(p.steps for p in passes) == 2 * (doomed - 1) + len(STEPS)
        assert sum(p.history for p in passes) == 3 * (doomed - 1) + old_history
        assert after["sagas"] == before["sagas"] - doomed + started
        assert after["steps"] == before["steps"] - 2 * (doomed - 1) - len(STEPS) + 3 * started
        assert after["active"] == before["active"] + started

        # Exactly the expired ones went: every active saga, and every finished saga still
        # within its name's window, is there with its idempotency key.
        cur = await conn.execute(
            "SELECT id, idempotency_key FROM sagaplane_sagas WHERE id < '01' ORDER BY id"
        )
        remaining = dict(await cur.fetchall())
        kept = [g for g in range(1, FINISHED + 1) if not expired(g)]
        kept += range(FINISHED + 1, FINISHED + ACTIVE + 1)
        assert remaining == {synthetic_id(g): f"synthetic-{g}" for g in kept}
        cur = await conn.execute(
            "SELECT count(*) FROM sagaplane_steps st"
            " WHERE NOT EXISTS (SELECT FROM sagaplane_sagas s WHERE s.id = st.saga_id)"
        )
        assert await cur.fetchone() == (0,)

        # A second pass finds nothing left.
        again = await pruners[0].run_pass()
        assert (again.sagas, again.steps, again.history) == (0, 0, 0)

    # What a client sees: the old saga is gone and its key starts a new saga; the
    # running and the fresh ones are still there and their keys still replay.
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetSaga(api.GetSagaRequest(id=old))
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND
    again_old = request("order.place")
    again_old.idempotency_key = "old"
    restarted = await stub.StartSaga(again_old)
    assert restarted.saga.id != old
    assert (await stub.StartSaga(running)).saga.id == live
    again_fresh = request("order.place")
    again_fresh.idempotency_key = "fresh"
    assert (await stub.StartSaga(again_fresh)).saga.id == fresh
    assert (await stub.GetSaga(api.GetSagaRequest(id=fresh))).saga.id == fresh


async def fill(database_url: str, finished: int) -> None:
    """``finished`` synthetic finished sagas (see _FINISHED), with steps and history."""
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        conn.transaction(),
    ):
        await conn.execute(_FINISHED, {"n": finished})
        await conn.execute(_STEPS)
        await conn.execute(_HISTORY)


async def test_prune_dry_run_says_what_would_go_and_prune_deletes_it(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(database_url, 20)
    doomed = [g for g in range(1, 21) if expired(g)]
    assert all(g % 10 for g in doomed)  # no payments saga is old enough
    flags = ["--database-url", database_url, "--retention", "30d"]
    flags += ["--retention-for", "payments=365d", "--outbox-retention", "off"]

    assert await asyncio.to_thread(exit_status, ["prune", "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    n = len(doomed)
    assert f"would delete {n} order.place sagas" in out
    assert f"{2 * n} steps, {3 * n} history entries" in out
    assert "payments" not in out.split("\n", 1)[1]  # (the first line states the rules)
    assert f"would delete {n} sagas and 0 sent outbox rows in all" in out
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert (await counts(conn))["sagas"] == 20

    assert await asyncio.to_thread(exit_status, ["prune", *flags]) == 0
    out = capsys.readouterr().out
    assert f"deleted {n} sagas ({2 * n} steps, {3 * n} history entries)" in out
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT id FROM sagaplane_sagas ORDER BY id")
        left = [row[0] for row in await cur.fetchall()]
    assert left == [synthetic_id(g) for g in range(1, 21) if g not in doomed]


async def test_prune_refuses_a_bad_rule(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (["--retention", "soon"], ["--retention-for", "payments"], ["--retention", "0"]):
        assert await asyncio.to_thread(exit_status, ["prune", *bad]) == 2
        assert "error" in capsys.readouterr().err


_OUTBOX = """
INSERT INTO sagaplane_outbox
    (message_id, exchange, routing_key, message_type, body, created_at, sent_at, parked_at)
SELECT %(what)s || '-' || g, 'sagaplane.commands', 'shop.create', 'StepCommand', '\\x00',
       now() - %(created)s::interval, now() - %(sent)s::interval, now() - %(parked)s::interval
FROM generate_series(1, %(n)s) AS g
"""


async def test_sent_outbox_rows_go_after_their_window_unsent_ones_stay(
    database_url: str, pools: list[Pool]
) -> None:
    rows = [
        ("old-sent", "3 days", "3 days", None, 5),
        ("late-sent", "3 days", "1 hour", None, 3),  # created long ago, sent recently
        ("fresh-sent", "1 minute", "1 minute", None, 3),
        ("old-parked", "3 days", None, "2 days", 2),
        ("old-pending", "3 days", None, None, 1),
        ("fresh-pending", "1 minute", None, None, 1),
    ]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for what, created, sent, parked, n in rows:
            params = {"what": what, "created": created, "sent": sent, "parked": parked, "n": n}
            await conn.execute(_OUTBOX, params)
        pruners = replicas(pools, Retention(outbox=timedelta(hours=24)))
        assert (await pruners[0].dry_run()) == ([], 5)
        passes = await asyncio.gather(*(p.run_pass() for p in pruners))
        assert sum(p.outbox for p in passes) == 5
        cur = await conn.execute("SELECT message_id FROM sagaplane_outbox ORDER BY id")
        left = {row[0].rsplit("-", 1)[0] for row in await cur.fetchall()}
    assert left == {"late-sent", "fresh-sent", "old-parked", "old-pending", "fresh-pending"}


_INBOX = """
INSERT INTO sagaplane_inbox
    (step_id, kind, saga_id, action, message_id, attempt, outcome, output, received_at)
SELECT %(what)s || '-' || g, 'execute', 'saga-' || g, 'shop.noop', 'm-' || g, 1,
       'succeeded', '{}'::jsonb, now() - %(age)s::interval
FROM generate_series(1, %(n)s) AS g
"""


async def test_a_participant_prunes_inbox_rows_older_than_its_window(amqp_url: str) -> None:
    async with (
        participant_database("sagaplane_retention", "SELECT 1") as url,
        participants(amqp_url, url) as make,
    ):
        participant = make(inbox_retention="1h", outbox_retention="off", prune_interval=0.1)

        @participant.step("shop.noop")
        async def noop(ctx: StepContext) -> dict[str, Any]:
            return {}

        await participant.migrate()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(_INBOX, {"what": "old", "age": "2 hours", "n": 3})
            await conn.execute(_INBOX, {"what": "fresh", "age": "1 minute", "n": 2})
            await conn.execute(
                _OUTBOX,
                {"what": "old-sent", "created": "3 days", "sent": "3 days", "parked": None, "n": 2},
            )
            await participant.start()
            for _ in range(200):
                cur = await conn.execute("SELECT step_id FROM sagaplane_inbox ORDER BY step_id")
                left = [row[0] for row in await cur.fetchall()]
                if len(left) == 2:
                    break
                await asyncio.sleep(0.05)
            assert left == ["fresh-1", "fresh-2"]
            # outbox_retention="off": sent rows are kept.
            cur = await conn.execute("SELECT count(*) FROM sagaplane_outbox")
            assert await cur.fetchone() == (2,)


def test_a_participant_refuses_a_bad_window() -> None:
    with pytest.raises(ConfigurationError, match="inbox_retention"):
        Participant("svc", database_url="postgresql:///x", inbox_retention="a while")
    with pytest.raises(ConfigurationError, match="outbox_retention"):
        Participant("svc", database_url="postgresql:///x", outbox_retention="0s")


async def test_a_listing_goes_on_past_a_saga_pruned_under_its_page_token(
    stub: Stub, coordinator: Coordinator, pools: list[Pool]
) -> None:
    made = [await finish(stub, coordinator, f"k{i}", "1 day") for i in range(5)]
    first = await stub.ListSagas(
        api.ListSagasRequest(page_size=2, states=[model.SAGA_STATE_COMPLETED])
    )
    assert [s.id for s in first.sagas] == [made[4], made[3]]
    # The saga the token continues after is pruned before the next page is asked for.
    async with await psycopg.AsyncConnection.connect(
        coordinator.settings.database_url, autocommit=True
    ) as conn:
        await conn.execute(
            "UPDATE sagaplane_sagas SET completed_at = now() - interval '40 days' WHERE id = %s",
            (made[3],),
        )
    assert (await replicas(pools)[0].run_pass()).sagas == 1
    rest: list[str] = []
    token = first.next_page_token
    while token:
        page = await stub.ListSagas(
            api.ListSagasRequest(page_size=2, states=[model.SAGA_STATE_COMPLETED], page_token=token)
        )
        rest += [s.id for s in page.sagas]
        token = page.next_page_token
    assert rest == [made[2], made[1], made[0]]
