"""Batched writes in a handler, against real PostgreSQL and RabbitMQ: ``ctx.batch`` and
psycopg's pipelined ``executemany`` send many statements in one round trip (counted on
the wire, :mod:`helpers.roundtrips`), with a single statement's error contract."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from helpers.participants import (
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
from helpers.roundtrips import round_trips
from sagaplane import StepContext, structs

__all__ = ["broker", "db", "make_participant"]  # fixtures, imported for pytest

ROWS = 500


@pytest.fixture(scope="module")
async def participant_url() -> AsyncIterator[str]:
    """The participants' database for this module."""
    async with participant_database(
        "sagaplane_batch",
        (
            "CREATE TABLE items (step_id text NOT NULL, n int NOT NULL, PRIMARY KEY (step_id, n));"
            "CREATE SEQUENCE ran"
        ),
    ) as url:
        yield url


async def _count(db: psycopg.AsyncConnection[Any], step_id: str) -> int:
    cur = await db.execute("SELECT count(*) FROM items WHERE step_id = %s", (step_id,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _ran(db: psycopg.AsyncConnection[Any]) -> int:
    """How often ``nextval('ran')`` was called (sequences ignore rollbacks)."""
    cur = await db.execute("SELECT last_value, is_called FROM ran")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]) if row[1] else 0


def _insert(step_id: str, n: int) -> tuple[str, tuple[str, int]]:
    return ("INSERT INTO items (step_id, n) VALUES (%s, %s)", (step_id, n))


async def test_ctx_batch_sends_many_statements_in_one_round_trip(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = f"items.batch.{uid()}"
    participant = make_participant()
    traced: list[Any] = []

    @participant.step(action)
    async def insert_all(ctx: StepContext) -> dict[str, Any]:
        with round_trips(ctx.tx) as trips:
            results = await ctx.batch(
                [_insert(ctx.step_id, n) for n in range(ROWS)]
                + [("SELECT count(*), max(n) FROM items WHERE step_id = %s", (ctx.step_id,))]
                + [("UPDATE items SET n = n WHERE false", None), ("SELECT %s", ("end",))]
            )
        traced.append(trips)
        [[(count, top)], [(end,)]] = results
        return {"count": count, "max": top, "end": end}

    await participant.start()
    step_id = uid()
    await broker.send(action=action, saga_id=uid(), step_id=step_id)
    reply = await broker.reply()

    assert reply.outcome == SUCCEEDED, reply.error
    assert structs.to_dict(reply.output) == {"count": ROWS, "max": ROWS - 1, "end": "end"}
    [trips] = traced
    assert trips.count == 1
    [[(kind, text)]] = trips.sent()
    assert kind == "Query" and text.count("INSERT INTO items") == ROWS
    assert await _count(db, step_id) == ROWS


async def test_the_first_failure_aborts_the_transaction_and_the_handler_sees_it(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = f"items.duplicate.{uid()}"
    participant = make_participant()
    seen: list[BaseException] = []
    before = await _ran(db)

    @participant.step(action)
    async def duplicate(ctx: StepContext) -> None:
        try:
            await ctx.batch(
                [
                    _insert(ctx.step_id, 1),
                    _insert(ctx.step_id, 1),  # fails
                    ("SELECT nextval('ran')", None),  # never runs
                ]
            )
        except psycopg.Error as exc:
            seen.append(exc)
            raise

    await participant.start()
    step_id = uid()
    await broker.send(action=action, saga_id=uid(), step_id=step_id)
    reply = await broker.reply()

    [error] = seen
    assert isinstance(error, psycopg.errors.UniqueViolation)
    # As for one statement that raises: a retryable failure, every write rolled back.
    assert (reply.outcome, reply.error.type, reply.error.retryable) == (
        FAILED,
        "UniqueViolation",
        True,
    )
    assert await _count(db, step_id) == 0
    assert await _ran(db) == before


async def test_a_batch_in_a_savepoint_lets_the_handler_go_on_without_it(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = f"items.recover.{uid()}"
    participant = make_participant()

    @participant.step(action)
    async def recover(ctx: StepContext) -> dict[str, Any]:
        try:
            async with ctx.tx.transaction():
                await ctx.batch([_insert(ctx.step_id, 1), _insert(ctx.step_id, 1)])
        except psycopg.errors.UniqueViolation:
            await ctx.batch([_insert(ctx.step_id, 2)])
            return {"recovered": True}
        return {"recovered": False}

    await participant.start()
    step_id = uid()
    await broker.send(action=action, saga_id=uid(), step_id=step_id)
    reply = await broker.reply()
    assert structs.to_dict(reply.output) == {"recovered": True}
    cur = await db.execute("SELECT n FROM items WHERE step_id = %s", (step_id,))
    assert await cur.fetchall() == [(2,)]


async def test_executemany_is_pipelined_in_one_round_trip_with_the_same_errors(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = f"items.many.{uid()}"
    participant = make_participant()
    traced: list[Any] = []

    @participant.step(action)
    async def many(ctx: StepContext) -> None:
        rows = [(ctx.step_id, n) for n in range(ROWS)]
        if ctx.input.get("duplicate"):
            rows.append((ctx.step_id, 0))
        with round_trips(ctx.tx) as trips:
            async with ctx.tx.cursor() as cur:
                await cur.executemany("INSERT INTO items (step_id, n) VALUES (%s, %s)", rows)
        traced.append(trips)

    await participant.start()
    good, bad = uid(), uid()
    await broker.send(action=action, saga_id=uid(), step_id=good)
    assert (await broker.reply()).outcome == SUCCEEDED
    await broker.send(action=action, saga_id=uid(), step_id=bad, input={"duplicate": True})
    failed = await broker.reply()

    trips = traced[0]
    assert trips.count == 1
    [sent] = trips.sent()
    assert sum(kind == "Execute" for kind, _ in sent) == ROWS
    assert await _count(db, good) == ROWS
    assert (failed.outcome, failed.error.type) == (FAILED, "UniqueViolation")
    assert await _count(db, bad) == 0
