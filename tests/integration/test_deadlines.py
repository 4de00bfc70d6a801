"""Handler deadlines against real PostgreSQL and RabbitMQ: a command's handler and its
transaction end with the attempt, enforced by the SDK (cancellation) and by PostgreSQL
(its own timeouts), so no connection, row lock or inbox claim outlives the attempt.

Most tests drive a participant with commands published as the coordinator does
(:mod:`helpers.participants`); the last runs a saga through a real coordinator.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from coordinator.app import Coordinator
from helpers.participants import (
    COMPENSATE,
    FAILED,
    SUCCEEDED,
    Broker,
    ParticipantFactory,
    broker,
    db,
    make_participant,
    participant_database,
    uid,
)
from sagaplane import RetryPolicy, SagaClient, StepContext, StepSpec, structs
from sagaplane.v1 import messages_pb2

__all__ = ["broker", "db", "make_participant"]  # fixtures, imported for pytest

SLEEP = 60.0
"""How long a stuck handler would go on if nothing stopped it."""
SOON = 5.0
"""Seconds within which what a deadline stops must be over; far below SLEEP."""


@pytest.fixture(scope="module")
async def participant_url() -> AsyncIterator[str]:
    """The participants' database for this module, with tables for the handlers."""
    async with participant_database(
        "sagaplane_deadlines",
        (
            "CREATE TABLE orders (id text PRIMARY KEY, step_id text NOT NULL, attempt int);"
            "CREATE TABLE accounts (id text PRIMARY KEY, balance int NOT NULL DEFAULT 0)"
        ),
    ) as url:
        yield url


async def _rows(db: psycopg.AsyncConnection[Any], query: str, *params: Any) -> list[Any]:
    cur = await db.execute(query.encode(), params or None)
    return await cur.fetchall()


async def _account(db: psycopg.AsyncConnection[Any]) -> str:
    """A fresh account row (balance 0) for one test."""
    account = f"acct-{uid()}"
    await db.execute("INSERT INTO accounts (id) VALUES (%s)", (account,))
    return account


async def _leftovers(db: psycopg.AsyncConnection[Any], *own: int) -> list[Any]:
    """What is left in this database of anyone but the test (whose backends are
    ``own``): sessions running a statement, waiting for a lock or idle in a
    transaction, and lock requests not granted."""
    mine = [db.info.backend_pid, *own]
    sessions = await _rows(
        db,
        "SELECT pid, state, wait_event_type, left(query, 60) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> ALL(%s) AND state <> 'idle' "
        # The outbox relay's own short transactions (claim, publish, mark sent) are not
        # the attempt's: they touch the outbox alone, where a command's touch the inbox.
        "AND NOT (query LIKE '%%sagaplane_outbox%%' AND query NOT LIKE '%%sagaplane_inbox%%')",
        mine,
    )
    waiting = await _rows(db, "SELECT pid, locktype FROM pg_locks WHERE NOT granted")
    return sessions + waiting


async def _until(check: Callable[[], Any], what: str) -> None:
    """Poll ``check`` (a coroutine function) until it is true; fail saying ``what``."""
    for _ in range(int(SOON / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {SOON}s: {what}")


def _deadline_exceeded(reply: messages_pb2.StepReply, seconds: str) -> bool:
    return (
        reply.outcome == FAILED
        and reply.error.type == "DeadlineExceeded"
        and reply.error.message == f"deadline exceeded after {seconds}s"
        and reply.error.retryable
    )


async def test_a_handler_sleeping_past_its_deadline_is_cancelled_and_its_retry_runs_at_once(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
) -> None:
    action = f"orders.slow.{uid()}"
    # ONE connection: the retry can only run if the cancelled attempt gave it back.
    participant = make_participant(pool_size=1)
    seen: dict[int, tuple[datetime | None, float]] = {}
    cancelled = asyncio.Event()

    @participant.step(action)
    async def slow(ctx: StepContext) -> dict[str, Any]:
        seen[ctx.attempt] = (ctx.deadline, ctx.time_left())
        await ctx.tx.execute(
            "INSERT INTO orders (id, step_id, attempt) VALUES (%s, %s, %s)",
            (f"{ctx.step_id}-{ctx.attempt}", ctx.step_id, ctx.attempt),
        )
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(SLEEP)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return {"attempt": ctx.attempt}

    await participant.start()
    saga_id, step_id = uid(), uid()
    sent_at, started = datetime.now(UTC), time.monotonic()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, timeout=1.0)
    await asyncio.sleep(0.2)
    # The retry arrives while attempt 1 still runs (it waits for the inbox row and the
    # one connection, both held by attempt 1).
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2, timeout=5.0)
    replies: dict[int, tuple[messages_pb2.StepReply, float]] = {}
    for _ in range(2):
        reply = await broker.reply()
        replies[reply.attempt] = (reply, time.monotonic() - started)

    first, first_after = replies[1]
    second, second_after = replies[2]
    assert _deadline_exceeded(first, "1.0"), first
    assert cancelled.is_set()
    # Cut a tenth of the timeout before the 1 s deadline: never early, and not after
    # the handler's own 60 s.
    assert 0.85 <= first_after < SOON
    assert second.outcome == SUCCEEDED
    assert structs.to_dict(second.output) == {"attempt": 2}
    assert second_after < SOON
    # What the handler was told: cancelled at 0.9 s, on this host's clock.
    deadline, left = seen[1]
    assert deadline is not None and deadline.tzinfo is not None
    assert abs((deadline - sent_at).total_seconds() - 0.9) < 0.2
    assert 0.5 < left <= 0.9
    # Attempt 1's write was rolled back; attempt 2's committed with its reply.
    rows = await _rows(db, "SELECT attempt FROM orders WHERE step_id = %s", step_id)
    assert rows == [(2,)]
    assert await _rows(
        db, "SELECT attempt, outcome FROM sagaplane_inbox WHERE step_id = %s", step_id
    ) == [(2, "succeeded")]
    assert await _leftovers(db) == []


async def test_postgresql_is_given_the_time_left_for_the_attempt_only(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = f"orders.limits.{uid()}"
    participant = make_participant(pool_size=2)
    seen: dict[str, tuple[int, int, float]] = {}

    @participant.step(action)
    async def limits(ctx: StepContext) -> None:
        cur = await ctx.tx.execute(
            "SELECT setting::int FROM pg_settings WHERE name IN "
            "('statement_timeout', 'idle_in_transaction_session_timeout') ORDER BY name DESC"
        )
        [(statement,), (idle,)] = await cur.fetchall()
        seen[f"{ctx.step_name}:{ctx.attempt}"] = (statement, idle, ctx.time_left())
        if ctx.attempt == 1 and ctx.input.get("stuck"):
            await asyncio.sleep(SLEEP)

    await participant.start()
    waiting = uid()
    await broker.send(
        action=action, saga_id=uid(), step_id=waiting, timeout=1.0, input={"stuck": True}
    )
    await asyncio.sleep(0.1)
    # Attempt 2 waits for attempt 1's inbox claim until attempt 1 is cut at 0.9 s.
    await broker.send(action=action, saga_id=uid(), step_id=waiting, attempt=2, timeout=5.0)
    await broker.reply()
    await broker.reply()
    free = uid()
    await broker.send(action=action, saga_id=uid(), step_id=free)  # no deadline
    await broker.reply()

    statement, idle, left = seen[f"step-{waiting}:1"]
    assert statement == idle and 900 < statement <= 1000  # the 1 s attempt's time left
    # After its wait, attempt 2's limits were renewed: its time left, not 5 s.
    statement, idle, left = seen[f"step-{waiting}:2"]
    assert statement == idle
    assert abs(statement / 1000 - (left + 0.5)) < 0.3, (statement, left)
    assert statement < 4500
    # SET LOCAL: the pooled connections' next transactions are not limited.
    assert seen[f"step-{free}:1"][:2] == (0, 0)


async def test_a_statement_blocked_on_a_row_lock_is_cancelled_at_the_deadline(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    participant_url: str,
) -> None:
    action = f"accounts.credit.{uid()}"
    participant = make_participant()
    account = await _account(db)

    @participant.step(action)
    async def credit(ctx: StepContext) -> dict[str, Any]:
        await ctx.tx.execute(
            "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (ctx.input["account"],)
        )
        return {"credited": 1}

    await participant.start()
    saga_id, step_id = uid(), uid()
    async with await psycopg.AsyncConnection.connect(participant_url) as holder:
        # Another session holds the row, and keeps it past the attempt's deadline.
        await holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
        started = time.monotonic()
        await broker.send(
            action=action,
            saga_id=saga_id,
            step_id=step_id,
            timeout=1.0,
            input={"account": account},
        )

        async def blocked() -> bool:
            waits = await _rows(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE accounts%%'",
            )
            return bool(waits[0][0])

        await _until(blocked, "the handler's UPDATE waits for the row lock")
        first = await broker.reply()
        after = time.monotonic() - started
        assert _deadline_exceeded(first, "1.0"), first
        assert 0.85 <= after < SOON
        # Nothing of the attempt is left while the lock is still held: no statement
        # waiting for it, no transaction, no lock request.
        assert await _leftovers(db, holder.info.backend_pid) == []
    # The lock is gone: the next attempt completes.
    await broker.send(
        action=action, saga_id=saga_id, step_id=step_id, attempt=2, timeout=1.0,
        input={"account": account},
    )  # fmt: skip
    second = await broker.reply()
    assert (second.attempt, second.outcome) == (2, SUCCEEDED)
    assert await _rows(db, "SELECT balance FROM accounts WHERE id = %s", account) == [(1,)]


async def test_postgresql_cancels_a_statement_the_handler_shields_from_cancellation(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    participant_url: str,
) -> None:
    action = f"accounts.stubborn.{uid()}"
    participant = make_participant()
    account = await _account(db)
    statements: list[asyncio.Future[Any]] = []

    @participant.step(action)
    async def stubborn(ctx: StepContext) -> None:
        # The SDK's cancellation reaches the handler but not this statement: only
        # PostgreSQL's statement_timeout can end it.
        update = asyncio.ensure_future(
            ctx.tx.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (account,))
        )
        statements.append(update)
        await asyncio.shield(update)

    await participant.start()
    async with await psycopg.AsyncConnection.connect(participant_url) as holder:
        await holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
        started = time.monotonic()
        await broker.send(action=action, saga_id=uid(), step_id=uid(), timeout=1.0)
        reply = await broker.reply()
        after = time.monotonic() - started
        assert _deadline_exceeded(reply, "1.0"), reply
        [update] = statements
        error = update.exception()
        assert isinstance(error, psycopg.errors.QueryCanceled)
        assert "statement timeout" in str(error)
        # At the deadline itself (the handler was cut at 0.9 s), not when the lock goes.
        assert 0.95 <= after < SOON
        assert await _leftovers(db, holder.info.backend_pid) == []
    assert await _rows(db, "SELECT balance FROM accounts WHERE id = %s", account) == [(0,)]


async def test_postgresql_ends_the_session_of_a_handler_blocking_the_event_loop(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    participant_url: str,
) -> None:
    action = f"accounts.blocking.{uid()}"
    participant = make_participant()
    account = await _account(db)
    blocked_for = 2.5

    @participant.step(action)
    async def blocking(ctx: StepContext) -> None:
        await ctx.tx.execute("UPDATE accounts SET balance = 1 WHERE id = %s", (account,))
        if ctx.attempt == 1:
            # A bug: a blocking call. No task of this process runs until it returns,
            # the SDK's cancellation included.
            time.sleep(blocked_for)  # noqa: ASYNC251 - the bug under test

    # Another thread, as another process would (this one's event loop is blocked),
    # asks for the row once the handler holds it, and notes when it got it.
    got_lock: list[float] = []

    def wait_for_the_row() -> None:
        time.sleep(0.3)
        with psycopg.connect(participant_url) as other:
            other.execute("SET lock_timeout = '10s'")
            other.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account,))
            got_lock.append(time.monotonic())

    await participant.start()
    saga_id, step_id = uid(), uid()
    waiter = threading.Thread(target=wait_for_the_row)
    started = time.monotonic()
    waiter.start()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, timeout=1.0)
    first = await broker.reply()
    await asyncio.to_thread(waiter.join)
    # PostgreSQL ended the idle transaction at the deadline: the row was free while the
    # handler still blocked the loop (and not before: the other session waited for it).
    [locked_at] = got_lock
    assert 0.9 <= locked_at - started < blocked_for
    assert _deadline_exceeded(first, "1.0"), first
    assert await _rows(db, "SELECT balance FROM accounts WHERE id = %s", account) == [(0,)]
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2, timeout=1.0)
    second = await broker.reply()
    assert (second.attempt, second.outcome) == (2, SUCCEEDED)
    assert await _rows(db, "SELECT balance FROM accounts WHERE id = %s", account) == [(1,)]
    assert await _leftovers(db) == []


async def test_a_command_arriving_after_its_deadline_is_answered_without_running(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = f"orders.late.{uid()}"
    participant = make_participant()
    seen: list[tuple[int, datetime | None, float]] = []

    @participant.step(action)
    async def late(ctx: StepContext) -> None:
        seen.append((ctx.attempt, ctx.deadline, ctx.time_left()))

    await participant.start()
    saga_id, step_id = uid(), uid()
    # Dispatched 5 s ago with a 2 s timeout: it waited in the queue 3 s too long.
    await broker.send(
        action=action, saga_id=saga_id, step_id=step_id, timeout=2.0,
        deadline=datetime.now(UTC) - timedelta(seconds=3),
    )  # fmt: skip
    reply = await broker.reply()
    assert reply.outcome == FAILED and reply.error.retryable
    assert reply.error.type == "DeadlineExceeded"
    assert reply.error.message.startswith(
        "deadline exceeded after 2.0s (not run: the command arrived 3."
    )
    assert "or this host's clock is ahead of the coordinator's" in reply.error.message
    assert seen == []
    # A command without a deadline (from an older coordinator) runs as long as it takes.
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2)
    assert (await broker.reply()).outcome == SUCCEEDED
    assert seen == [(2, None, float("inf"))]


async def test_a_compensation_runs_under_its_deadline_too(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
) -> None:
    action = f"orders.undo.{uid()}"
    participant = make_participant()

    @participant.compensation(action)
    async def undo(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "INSERT INTO orders (id, step_id) VALUES (%s, %s)", (uid(), ctx.step_id)
        )
        await asyncio.sleep(SLEEP)

    await participant.start()
    step_id = uid()
    await broker.send(
        action=action, saga_id=uid(), step_id=step_id, kind=COMPENSATE, timeout=0.5,
        output={"order": 1},
    )  # fmt: skip
    reply = await broker.reply()
    assert reply.kind == COMPENSATE
    assert _deadline_exceeded(reply, "0.5"), reply
    assert await _rows(db, "SELECT 1 FROM orders WHERE step_id = %s", step_id) == []


async def test_a_saga_whose_handler_overruns_completes_on_the_next_attempt(
    coordinator: Coordinator,
    make_participant: ParticipantFactory,
    db: psycopg.AsyncConnection[Any],
) -> None:
    action = f"orders.flaky.{uid()}"
    participant = make_participant()

    @participant.step(action)
    async def flaky(ctx: StepContext) -> dict[str, Any]:
        await ctx.tx.execute(
            "INSERT INTO orders (id, step_id, attempt) VALUES (%s, %s, %s)",
            (uid(), ctx.step_id, ctx.attempt),
        )
        if ctx.attempt == 1:
            await asyncio.sleep(SLEEP)
        return {"attempt": ctx.attempt}

    await participant.start()
    started = time.monotonic()
    async with SagaClient(f"127.0.0.1:{coordinator.port}") as client:
        saga = await client.start_saga(
            "orders.flaky",
            [StepSpec("place", action, timeout=3, retry_policy=RetryPolicy(initial_interval=0.1))],
        )
        saga = await client.wait(saga.id, timeout=20)
        saga = await client.get_saga(saga.id, include_history=True)
    assert saga.state == "completed"
    assert time.monotonic() - started < 3 + SOON  # not after the first handler's 60 s
    step = saga.step("place")
    assert (step.attempts, step.output) == (2, {"attempt": 2})
    # The participant's own failure arrived before the coordinator timed the attempt
    # out: it knows attempt 1's writes were rolled back (the outcome is not unknown).
    assert not step.outcome_unknown
    failed = [h.reason for h in saga.history if h.event == "step_attempt_failed"]
    assert len(failed) == 1
    assert failed[0].startswith("DeadlineExceeded: deadline exceeded after 3.0s")
    rows = await _rows(db, "SELECT attempt FROM orders WHERE step_id = %s", step.id)
    assert rows == [(2,)]
