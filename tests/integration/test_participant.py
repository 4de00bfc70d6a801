"""The participant SDK against real PostgreSQL and RabbitMQ, without a coordinator.

Each module gets a fresh database and a fresh RabbitMQ vhost. Tests publish StepCommand
envelopes to ``sagaplane.commands`` the way the coordinator does, and read the replies
from a per-test queue bound to ``sagaplane.replies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import psycopg
import pytest

from helpers.broker import fresh_vhost
from helpers.participants import (
    COMPENSATE,
    EXECUTE,
    FAILED,
    SUCCEEDED,
    WAIT,
    Broker,
    ParticipantFactory,
    broker,
    db,
    make_participant,
    participant_database,
)
from helpers.participants import uid as _uid
from sagaplane import (
    CallNext,
    Delivery,
    Middleware,
    NonRetryableError,
    Participant,
    Processed,
    RetryableError,
    StepContext,
    StepKind,
    structs,
    topology,
)

__all__ = ["broker", "db", "make_participant"]  # fixtures, imported for pytest

# -- module fixtures: a fresh database and a fresh vhost ---------------------------------


@pytest.fixture(scope="module")
async def database_url() -> AsyncIterator[str]:
    """A fresh database for this module, with a table for the handlers to write to."""
    async with participant_database(
        "sagaplane_participant", "CREATE TABLE orders (id text PRIMARY KEY, step_id text NOT NULL)"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def participant_url(database_url: str) -> str:
    """The participants' database (the helpers' fixtures use it): this module's."""
    return database_url


@pytest.fixture(scope="module")
async def amqp_url() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost for this module (guest has every permission on it)."""
    async with fresh_vhost() as url:
        yield url


# -- per-test helpers ------------------------------------------------------------------


async def _scalar(db: psycopg.AsyncConnection[Any], query: str, *params: Any) -> Any:
    cur = await db.execute(query.encode(), params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _insert_order(ctx: StepContext) -> None:
    """A handler's write: the order row of its step."""
    await ctx.tx.execute(
        "INSERT INTO orders (id, step_id) VALUES (%s, %s)", (f"o-{ctx.step_id}", ctx.step_id)
    )


async def _orders(db: psycopg.AsyncConnection[Any], step_id: str) -> int:
    """How many order rows the step's handler runs left committed."""
    return int(await _scalar(db, "SELECT count(*) FROM orders WHERE step_id = %s", step_id))


async def _inbox_outcome(db: psycopg.AsyncConnection[Any], step_id: str) -> Any:
    """The outcome the inbox stored for the step."""
    return await _scalar(db, "SELECT outcome FROM sagaplane_inbox WHERE step_id = %s", step_id)


def _action(name: str) -> str:
    # Unique per test: queues of earlier tests stay bound to their actions in this vhost.
    return f"{name}.{_uid()}"


# -- tests ------------------------------------------------------------------------------


async def test_handler_writes_and_reply_commit_together(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()
    seen: list[StepContext] = []

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        await ctx.tx.execute(
            "INSERT INTO orders (id, step_id) VALUES (%s, %s)", (ctx.input["order"], ctx.step_id)
        )
        return {"order_id": ctx.input["order"], "qty": ctx.input["qty"]}

    await participant.start()
    saga_id, step_id, order = _uid(), _uid(), f"o-{_uid()}"
    message_id = await broker.send(
        action=action,
        saga_id=saga_id,
        step_id=step_id,
        token="tok-1",
        input={"order": order, "qty": 2},
    )

    reply, message = await broker.reply_message()
    assert reply.saga_id == saga_id and reply.step_id == step_id
    assert (reply.attempt, reply.kind, reply.token) == (1, EXECUTE, "tok-1")
    assert reply.outcome == SUCCEEDED
    assert structs.to_dict(reply.output) == {"order_id": order, "qty": 2}
    assert message.message_id == f"{message_id}:reply"
    assert message.correlation_id == saga_id
    assert message.type == "sagaplane.v1.StepReply"
    assert message.content_type == topology.CONTENT_TYPE
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    [ctx] = seen
    assert (ctx.saga_id, ctx.step_id, ctx.saga_name, ctx.attempt) == (
        saga_id,
        step_id,
        "test.saga",
        1,
    )
    assert ctx.kind is StepKind.EXECUTE and ctx.action == action
    assert ctx.context == {"customer": "c-1"} and ctx.output is None
    assert ctx.message_id == message_id
    # The handler's row, the inbox row and the (now sent) reply are one committed fact.
    assert await _scalar(db, "SELECT step_id FROM orders WHERE id = %s", order) == step_id
    assert (
        await _scalar(
            db,
            "SELECT outcome FROM sagaplane_inbox WHERE step_id = %s AND kind = 'execute'",
            step_id,
        )
        == "succeeded"
    )
    # The reply arrived, so the relay marks its row sent right after the confirm.
    for _ in range(100):
        sent = await _scalar(
            db,
            "SELECT sent_at IS NOT NULL FROM sagaplane_outbox WHERE message_id = %s",
            f"{message_id}:reply",
        )
        if sent:
            break
        await asyncio.sleep(0.05)
    assert sent
    await broker.no_more_replies()


async def test_redelivered_command_runs_once_and_every_copy_is_answered(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()
    calls = 0

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await _insert_order(ctx)
        await asyncio.sleep(0.05)  # keep the copies' transactions overlapping
        return {"n": calls}

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    # The same message twice, back to back: handled concurrently (prefetch > 1), the
    # second copy waits on the first one's inbox row.
    for _ in range(2):
        await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="tok-1")

    replies = [await broker.reply(), await broker.reply()]
    for reply in replies:
        assert reply.outcome == SUCCEEDED
        assert (reply.attempt, reply.token) == (1, "tok-1")
        assert structs.to_dict(reply.output) == {"n": 1}
    assert calls == 1
    assert await _orders(db, step_id) == 1
    assert await _scalar(db, "SELECT replies FROM sagaplane_inbox WHERE step_id = %s", step_id) == 2
    await broker.no_more_replies()


async def test_a_command_redelivered_after_commit_but_before_ack_is_answered_from_the_inbox(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    amqp_url: str,
    database_url: str,
) -> None:
    action = _action("orders.create")
    # The process "dies" between COMMIT and ack: a middleware that never returns after
    # call_next(), so the ack is never sent; stop() cancels it after shutdown_timeout.
    committed: list[Processed] = []
    acks_lost = asyncio.Event()

    async def die_before_ack(delivery: Delivery, call_next: CallNext) -> None:
        committed.append(await call_next())
        acks_lost.set()
        await asyncio.Event().wait()

    first = make_participant(middleware=[die_before_ack], shutdown_timeout=0.3)
    calls = 0

    async def create(ctx: StepContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await _insert_order(ctx)
        return {"order_id": f"o-{ctx.step_id}"}

    first.step(action)(create)
    await first.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id, token="t1")
    first_reply = await broker.reply()
    async with asyncio.timeout(WAIT):
        await acks_lost.wait()
    assert committed == [Processed.HANDLED]
    await first.stop()  # the unacked command is cancelled; the broker requeues it

    second = Participant(first.service, amqp_url=amqp_url, database_url=database_url)
    second.step(action)(create)
    async with second:
        second_reply = await broker.reply()
    assert first_reply.outcome == second_reply.outcome == SUCCEEDED
    assert structs.to_dict(second_reply.output) == structs.to_dict(first_reply.output)
    assert (second_reply.attempt, second_reply.token) == (1, "t1")
    assert calls == 1
    assert await _orders(db, step_id) == 1
    assert await broker.queue_depth(first.service) == 0


async def test_retried_command_gets_the_stored_outcome_with_its_own_attempt_and_token(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("payments.charge")
    participant = make_participant()
    calls = 0

    @participant.step(action)
    async def charge(ctx: StepContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"charge_id": f"ch-{calls}"}

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="tok-1")
    first = await broker.reply()
    # The coordinator timed out waiting and retried: attempt 2, a new token.
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2, token="tok-2")
    second = await broker.reply()

    assert (first.attempt, first.token) == (1, "tok-1")
    assert (second.attempt, second.token) == (2, "tok-2")
    assert first.outcome == second.outcome == SUCCEEDED
    assert structs.to_dict(first.output) == structs.to_dict(second.output) == {"charge_id": "ch-1"}
    assert calls == 1


class OutOfStock(NonRetryableError):
    """No stock left."""


@pytest.mark.parametrize(
    ("error", "error_type", "message", "retryable"),
    [
        (RetryableError("gateway busy"), "RetryableError", "gateway busy", True),
        (NonRetryableError("card declined"), "NonRetryableError", "card declined", False),
        (OutOfStock(), "OutOfStock", "No stock left.", False),
        (NonRetryableError("nope", error_type="Declined"), "Declined", "nope", False),
        (ValueError("bad qty"), "ValueError", "bad qty", True),
    ],
)
async def test_a_raising_handler_rolls_back_its_writes_and_replies_failed(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    error: Exception,
    error_type: str,
    message: str,
    retryable: bool,
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        raise error

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id, token="tok-1")

    reply = await broker.reply()
    assert reply.outcome == FAILED
    assert (reply.error.type, reply.error.message, reply.error.retryable) == (
        error_type,
        message,
        retryable,
    )
    assert reply.token == "tok-1"
    assert not reply.HasField("output")
    assert await _orders(db, step_id) == 0
    assert await _inbox_outcome(db, step_id) == "failed"


async def test_a_handler_that_swallows_a_failed_statement_fails_the_step_and_rolls_back(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            await _insert_order(ctx)
        return {"ok": True}  # but its transaction is aborted

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    assert (reply.outcome, reply.error.type, reply.error.retryable) == (
        FAILED,
        "InFailedSqlTransaction",
        True,
    )
    assert await _orders(db, step_id) == 0
    assert await _inbox_outcome(db, step_id) == "failed"


async def test_a_handler_may_nest_a_savepoint_to_recover_from_a_failed_statement(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        try:
            async with ctx.tx.transaction():
                await _insert_order(ctx)
        except psycopg.errors.UniqueViolation:
            return {"duplicate": True}
        return {"duplicate": False}

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    assert reply.outcome == SUCCEEDED and structs.to_dict(reply.output) == {"duplicate": True}
    assert await _orders(db, step_id) == 1


async def test_a_handler_that_commits_the_sdk_transaction_is_not_answered_but_requeued(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    """Committing ctx.tx is a bug: the SDK does not report that run as the outcome."""
    action = _action("orders.create")
    participant = make_participant()
    runs: list[int] = []

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            await ctx.tx.commit()
        return {"run": len(runs)}

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    # The first run's commit left a claim without an outcome: the redelivered command
    # counts as not handled and runs again; only that run is answered.
    assert reply.outcome == SUCCEEDED and structs.to_dict(reply.output) == {"run": 2}
    assert runs == [1, 1]
    assert await _inbox_outcome(db, step_id) == "succeeded"
    await broker.no_more_replies()


async def test_a_command_that_fails_on_every_delivery_is_dead_lettered_with_the_reason(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("orders.create")
    participant = make_participant()
    runs = 0

    @participant.step(action)
    async def create(ctx: StepContext) -> None:
        nonlocal runs
        runs += 1
        await ctx.tx.commit()  # a bug on every run: the command is requeued each time

    await participant.start()
    message_id = await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    reason = await broker.dead_letter_reason(message_id)
    assert reason.startswith(f"failed on all {topology.DELIVERY_LIMIT} deliveries: ")
    assert "ended the SDK's transaction" in reason
    assert runs == topology.DELIVERY_LIMIT
    assert participant.dead_lettered == {"failed": 1}
    await broker.no_more_replies()


@pytest.mark.parametrize(
    "returned", [["not", "a", "dict"], {"when": object()}, {"x": float("nan")}]
)
async def test_an_output_that_is_not_a_json_object_fails_the_step_and_rolls_back(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    returned: Any,
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> Any:
        await _insert_order(ctx)
        return returned

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    assert (reply.outcome, reply.error.type, reply.error.retryable) == (
        FAILED,
        "InvalidOutput",
        False,
    )
    assert await _orders(db, step_id) == 0


async def test_a_handler_raising_with_a_nul_in_its_message_fails_at_once(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> None:
        await _insert_order(ctx)
        raise NonRetryableError("card\x00number", error_type="Bad\x00Card")

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    # Answered on the first delivery, NUL replaced (PostgreSQL text cannot hold it).
    assert (reply.outcome, reply.error.retryable) == (FAILED, False)
    assert reply.error.message == "card\N{REPLACEMENT CHARACTER}number"
    assert reply.error.type == "Bad\N{REPLACEMENT CHARACTER}Card"
    assert await _orders(db, step_id) == 0
    assert await _inbox_outcome(db, step_id) == "failed"
    await broker.no_more_replies()
    assert await broker.queue_depth(participant.service) == 0


async def test_a_handler_returning_20_mb_fails_at_once_without_a_requeue_loop(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()
    runs = 0

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await _insert_order(ctx)
        return {"blob": "x" * (20 * 1024 * 1024)}

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    assert (reply.outcome, reply.error.type, reply.error.retryable) == (
        FAILED,
        "OutputTooLarge",
        False,
    )
    assert "at most 65536" in reply.error.message
    assert await _orders(db, step_id) == 0
    await broker.no_more_replies()
    assert runs == 1


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        ({"note": "a\x00b"}, "output.note: contains a NUL character"),
        ({"k\x00": 1}, "the key contains a NUL character"),
        ({"deep": _nested(21)}, "nested deeper than 20"),
    ],
)
async def test_an_output_the_coordinator_would_refuse_fails_the_step(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    returned: dict[str, Any],
    problem: str,
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        return returned

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    reply = await broker.reply()
    assert (reply.outcome, reply.error.type, reply.error.retryable) == (
        FAILED,
        "InvalidOutput",
        False,
    )
    assert problem in reply.error.message
    assert await _orders(db, step_id) == 0


async def test_a_command_the_inbox_could_not_store_is_dead_lettered_with_its_reason(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    await participant.start()
    nul_id = await broker.send(action=action, saga_id="s\x00x", step_id=_uid())
    reason = await broker.dead_letter_reason(nul_id)
    assert reason == "saga_id contains a NUL character"
    nan_id = await broker.send(action=action, saga_id=_uid(), step_id=_uid(), input={"q": math.nan})
    assert await broker.dead_letter_reason(nan_id) == "input.q: is not a finite number"
    assert participant.dead_lettered == {"undecodable": 2}
    await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    assert (await broker.reply()).outcome == SUCCEEDED


async def test_a_retryable_failure_runs_again_on_the_next_attempt_only(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("payments.charge")
    participant = make_participant()
    calls = 0

    @participant.step(action)
    async def charge(ctx: StepContext) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("gateway timed out")
        return {"charge": calls}

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="t1")
    assert (await broker.reply()).error.type == "TimeoutError"
    # A redelivered copy of attempt 1 gets the stored failure: attempt 1 did fail.
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="t1")
    again = await broker.reply()
    assert (again.outcome, again.error.retryable, calls) == (FAILED, True, 1)
    # Attempt 2 runs the handler again; attempt 3 gets attempt 2's success.
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2, token="t2")
    second = await broker.reply()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=3, token="t3")
    third = await broker.reply()
    assert (second.outcome, second.attempt, structs.to_dict(second.output)) == (
        SUCCEEDED,
        2,
        {"charge": 2},
    )
    assert (third.outcome, third.attempt, third.token) == (SUCCEEDED, 3, "t3")
    assert structs.to_dict(third.output) == {"charge": 2}
    assert calls == 2


async def test_a_non_retryable_failure_is_final_for_its_attempt_only(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("payments.charge")
    participant = make_participant()
    calls = 0

    @participant.step(action)
    async def charge(ctx: StepContext) -> None:
        nonlocal calls
        calls += 1
        raise NonRetryableError("card declined")

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="t1")
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, token="t1")
    replies = [await broker.reply(), await broker.reply()]
    assert [(r.attempt, r.token, r.error.message) for r in replies] == [
        (1, "t1", "card declined"),
        (1, "t1", "card declined"),
    ]
    assert calls == 1  # the redelivered copy was answered from the inbox
    # A later attempt only comes when the coordinator (or an operator's RETRY) decided
    # to try again: the handler runs again.
    await broker.send(action=action, saga_id=saga_id, step_id=step_id, attempt=2, token="t2")
    reply = await broker.reply()
    assert (reply.attempt, reply.token, reply.error.message) == (2, "t2", "card declined")
    assert calls == 2


async def test_compensation_gets_the_output_and_runs_once(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    create_action, delete_action = _action("orders.create"), _action("orders.delete")
    participant = make_participant()
    undone: list[StepContext] = []

    @participant.step(create_action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        return {"order_id": f"o-{ctx.step_id}"}

    @participant.compensation(delete_action)
    async def delete(ctx: StepContext) -> None:
        undone.append(ctx)
        assert ctx.output is not None
        await ctx.tx.execute("DELETE FROM orders WHERE id = %s", (ctx.output["order_id"],))

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    await broker.send(action=create_action, saga_id=saga_id, step_id=step_id)
    output = structs.to_dict((await broker.reply()).output)
    for attempt in (1, 2):
        await broker.send(
            action=delete_action,
            saga_id=saga_id,
            step_id=step_id,
            kind=COMPENSATE,
            attempt=attempt,
            output=output,
        )
        reply = await broker.reply()
        assert (reply.kind, reply.outcome, reply.attempt) == (COMPENSATE, SUCCEEDED, attempt)
    assert len(undone) == 1
    assert undone[0].kind is StepKind.COMPENSATE and undone[0].output == output
    assert await _orders(db, step_id) == 0


async def test_an_execute_arriving_after_its_compensation_is_not_run(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    create_action, delete_action = _action("orders.create"), _action("orders.delete")
    participant = make_participant()
    executed = 0

    @participant.step(create_action)
    async def create(ctx: StepContext) -> None:
        nonlocal executed
        executed += 1

    @participant.compensation(delete_action)
    async def delete(ctx: StepContext) -> None:
        return None  # nothing to undo: the action never ran here

    await participant.start()
    saga_id, step_id = _uid(), _uid()
    await broker.send(action=delete_action, saga_id=saga_id, step_id=step_id, kind=COMPENSATE)
    assert (await broker.reply()).outcome == SUCCEEDED
    await broker.send(action=create_action, saga_id=saga_id, step_id=step_id)
    late = await broker.reply()
    assert (late.outcome, late.error.type, late.error.retryable) == (
        FAILED,
        "StepAlreadyCompensated",
        False,
    )
    assert executed == 0


async def test_undecodable_commands_are_dead_lettered_unknown_ones_answered_and_work_goes_on(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action, other = _action("orders.create"), _action("orders.other")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    # Registered only so that the queue is bound to `other`; its kind is compensate.
    @participant.compensation(other)
    async def undo(ctx: StepContext) -> None:
        return None

    await participant.start()
    garbage_id = f"garbage-{_uid()}"
    await broker.publish_raw(action, b"\xff\xfe not a protobuf \x00", message_id=garbage_id)
    assert await broker.dead_letter(garbage_id) == b"\xff\xfe not a protobuf \x00"

    # A valid envelope for an action/kind this service has no handler for: answered with
    # a non-retryable failure naming the action, so that its saga compensates at once.
    await broker.send(action=other, saga_id=_uid(), step_id=_uid(), kind=EXECUTE)
    refused = await broker.reply()
    assert refused.outcome == FAILED
    assert (refused.error.type, refused.error.retryable) == ("NoHandler", False)
    assert f"no execute handler for action {other!r}" in refused.error.message

    # An envelope missing required fields.
    empty_id = f"empty-{_uid()}"
    await broker.publish_raw(action, b"", message_id=empty_id)
    await broker.dead_letter(empty_id)

    await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    assert (await broker.reply()).outcome == SUCCEEDED
    await broker.no_more_replies()


async def test_a_participant_restarted_without_a_handler_unbinds_its_action(
    amqp_url: str, database_url: str, broker: Broker
) -> None:
    service, kept, removed = f"svc-{_uid()}", _action("orders.create"), _action("orders.old")

    def build(*actions: str) -> Participant:
        participant = Participant(service, amqp_url=amqp_url, database_url=database_url)
        for action in actions:

            @participant.step(action)
            async def handle(ctx: StepContext) -> dict[str, Any]:
                return {"ok": True}

        return participant

    async with build(kept, removed):
        pass
    async with build(kept) as restarted:
        # The removed action reaches no queue any more: the publisher is told at once
        # (NO_ROUTE), instead of the command being dead-lettered by a service that
        # cannot handle it while its saga waits out its timeouts.
        strict = await broker.connection.channel(on_return_raises=True)
        commands = await strict.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        with pytest.raises(aiormq.exceptions.DeliveryError) as refused:
            await commands.publish(aio_pika.Message(b"x"), routing_key=removed, mandatory=True)
        assert "NO_ROUTE" in str(refused.value)
        await strict.close()
        await broker.send(action=kept, saga_id=_uid(), step_id=_uid())
        assert (await broker.reply()).outcome == SUCCEEDED
        assert restarted.dead_lettered == {}

    # Registered again, it is bound again; a start with the same handlers changes nothing.
    for _ in range(2):
        async with build(kept, removed):
            await broker.send(action=removed, saga_id=_uid(), step_id=_uid())
            assert (await broker.reply()).outcome == SUCCEEDED
    # One record of the bindings is left, whatever the number of starts.
    ledger = await broker.channel.declare_queue(topology.bindings_queue(service), passive=True)
    assert ledger.declaration_result.message_count == 1


async def test_stop_lets_in_flight_handlers_finish_and_publishes_their_replies(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    participant = make_participant()
    started, release = asyncio.Event(), asyncio.Event()

    @participant.step(action)
    async def slow(ctx: StepContext) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"done": True}

    await participant.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id)
    async with asyncio.timeout(WAIT):
        await started.wait()

    stopping = asyncio.create_task(participant.stop(), name="test-stop")
    await asyncio.sleep(0.2)
    assert not stopping.done(), "stop() must wait for the in-flight handler"
    release.set()
    async with asyncio.timeout(WAIT):
        await stopping
    await participant.stop()  # idempotent

    reply = await broker.reply()
    assert reply.step_id == step_id and reply.outcome == SUCCEEDED
    # Acked after commit: nothing is left in (or returns to) the queue.
    await asyncio.sleep(0.2)
    assert await broker.queue_depth(participant.service) == 0


async def test_stop_cancels_a_stuck_handler_and_the_command_is_redelivered(
    make_participant: ParticipantFactory,
    broker: Broker,
    db: psycopg.AsyncConnection[Any],
    amqp_url: str,
    database_url: str,
) -> None:
    action = _action("orders.create")
    first = make_participant(shutdown_timeout=0.3)
    started = asyncio.Event()

    @first.step(action)
    async def stuck(ctx: StepContext) -> None:
        await _insert_order(ctx)
        started.set()
        await asyncio.Event().wait()

    await first.start()
    step_id = _uid()
    await broker.send(action=action, saga_id=_uid(), step_id=step_id, token="t1")
    async with asyncio.timeout(WAIT):
        await started.wait()
    async with asyncio.timeout(WAIT):
        await first.stop()
    assert await _orders(db, step_id) == 0

    # A new process of the same service picks the command up again.
    second = Participant(
        first.service,
        amqp_url=amqp_url,
        database_url=database_url,
        relay_poll_interval=0.2,
    )

    @second.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        await _insert_order(ctx)
        return {"attempt": ctx.attempt}

    async with second:
        reply = await broker.reply()
    assert (reply.step_id, reply.outcome, reply.token) == (step_id, SUCCEEDED, "t1")
    assert await _orders(db, step_id) == 1


async def test_run_serves_until_cancelled(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("orders.create")
    participant = make_participant()

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    await participant.start()  # so that the queue exists before we publish; run() reuses it
    running = asyncio.create_task(participant.run(handle_sigterm=False), name="test-run")
    await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    assert (await broker.reply()).outcome == SUCCEEDED
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert running.done()
    with pytest.raises(RuntimeError):
        await participant.start()


async def test_handlers_must_be_registered_once_and_before_start(
    make_participant: ParticipantFactory,
) -> None:
    from sagaplane import ConfigurationError

    participant = make_participant()
    with pytest.raises(ConfigurationError):
        await participant.start()  # nothing registered

    async def handler(ctx: StepContext) -> None:
        return None

    participant.step("a.b")(handler)
    with pytest.raises(ConfigurationError):
        participant.step("a.b")(handler)
    participant.compensation("a.b")(handler)  # the same name as a compensation is fine
    assert participant.actions == ["a.b"]


# -- middleware -------------------------------------------------------------------------


async def test_middleware_runs_outermost_first_around_the_commit_and_before_the_ack(
    make_participant: ParticipantFactory, broker: Broker, db: psycopg.AsyncConnection[Any]
) -> None:
    action = _action("orders.create")
    events: list[str] = []
    done = asyncio.Event()

    def layer(name: str) -> Middleware:
        async def middleware(delivery: Delivery, call_next: CallNext) -> None:
            assert delivery.command is not None
            assert (delivery.action, delivery.kind, delivery.refusal) == (
                action,
                StepKind.EXECUTE,
                None,
            )
            events.append(f"{name} before, orders={await _orders(db, delivery.command.step_id)}")
            processed = await call_next()
            # After the commit (another connection sees the write), before the ack.
            orders = await _orders(db, delivery.command.step_id)
            events.append(f"{name} after: {processed}, orders={orders}, "
                          f"settled={delivery.message.processed}")  # fmt: skip
            if name == "outer":
                done.set()

        return middleware

    participant = make_participant(middleware=[layer("outer"), layer("inner")])

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        events.append("handler")
        await _insert_order(ctx)
        return {"ok": True}

    await participant.start()
    await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    assert (await broker.reply()).outcome == SUCCEEDED
    async with asyncio.timeout(WAIT):
        await done.wait()
    assert events == [
        "outer before, orders=0",
        "inner before, orders=0",
        "handler",
        "inner after: handled, orders=1, settled=False",
        "outer after: handled, orders=1, settled=False",
    ]
    # Acked once the outermost middleware returned: nothing is left in the queue.
    await asyncio.sleep(0.2)
    assert await broker.queue_depth(participant.service) == 0
    await broker.no_more_replies()


async def test_middleware_sees_replays_and_refusals(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    create_action, delete_action = _action("orders.create"), _action("orders.delete")
    seen: asyncio.Queue[tuple[str | None, StepKind | None, Processed]] = asyncio.Queue()

    async def watch(delivery: Delivery, call_next: CallNext) -> None:
        processed = await call_next()
        await seen.put((delivery.action, delivery.kind, processed))

    participant = make_participant(middleware=[watch])
    runs = 0

    @participant.step(create_action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {"n": runs}

    @participant.compensation(delete_action)
    async def delete(ctx: StepContext) -> None:
        return None

    async def next_seen() -> tuple[str | None, StepKind | None, Processed]:
        async with asyncio.timeout(WAIT):
            return await seen.get()

    await participant.start()
    handled, compensated = _uid(), _uid()
    for _ in range(2):  # a command and its copy
        await broker.send(action=create_action, saga_id=_uid(), step_id=handled, token="t1")
        assert (await broker.reply()).outcome == SUCCEEDED
    await broker.send(action=delete_action, saga_id=_uid(), step_id=compensated, kind=COMPENSATE)
    assert (await broker.reply()).outcome == SUCCEEDED
    await broker.send(action=create_action, saga_id=_uid(), step_id=compensated)
    assert (await broker.reply()).error.type == "StepAlreadyCompensated"
    assert [await next_seen() for _ in range(4)] == [
        (create_action, StepKind.EXECUTE, Processed.HANDLED),
        (create_action, StepKind.EXECUTE, Processed.REPLAYED),
        (delete_action, StepKind.COMPENSATE, Processed.HANDLED),
        (create_action, StepKind.EXECUTE, Processed.REFUSED),
    ]
    assert runs == 1
    await broker.no_more_replies()


async def test_middleware_sees_messages_that_are_dead_lettered_with_the_reason_it_is_given(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action, other = _action("orders.create"), _action("orders.other")
    seen: dict[str, tuple[bool, str | None, Processed]] = {}

    async def watch(delivery: Delivery, call_next: CallNext) -> None:
        processed = await call_next()
        seen[delivery.message.message_id or ""] = (
            delivery.command is None,
            delivery.refusal,
            processed,
        )

    participant = make_participant(middleware=[watch])

    @participant.step(action)
    async def create(ctx: StepContext) -> None:
        raise AssertionError("never called")

    @participant.compensation(other)  # binds the queue to `other`; no execute handler
    async def undo(ctx: StepContext) -> None:
        return None

    await participant.start()
    garbage_id = f"garbage-{_uid()}"
    await broker.publish_raw(action, b"\xff\xfe not a protobuf \x00", message_id=garbage_id)
    garbage_reason = await broker.dead_letter_reason(garbage_id)
    unknown_id = await broker.send(action=other, saga_id=_uid(), step_id=_uid(), kind=EXECUTE)
    refused = await broker.reply()
    assert seen == {
        garbage_id: (True, garbage_reason, Processed.DEAD_LETTERED),
        # Processed: answered with a NoHandler failure, not dead-lettered.
        unknown_id: (False, None, Processed.HANDLED),
    }
    assert "not a StepCommand" in garbage_reason
    assert f"no execute handler for action {other!r}" in refused.error.message
    assert participant.dead_lettered == {"undecodable": 1}
    await broker.no_more_replies()


async def test_a_middleware_raising_before_call_next_counts_as_a_failed_command(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("orders.create")
    deliveries = 0

    async def broken(delivery: Delivery, call_next: CallNext) -> None:
        nonlocal deliveries
        deliveries += 1
        raise RuntimeError("the middleware is broken")

    participant = make_participant(middleware=[broken])
    runs = 0

    @participant.step(action)
    async def create(ctx: StepContext) -> None:
        nonlocal runs
        runs += 1

    await participant.start()
    message_id = await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    # Requeued on every delivery, dead-lettered with the reason on the last one.
    reason = await broker.dead_letter_reason(message_id)
    assert reason == (
        f"failed on all {topology.DELIVERY_LIMIT} deliveries: "
        "RuntimeError: the middleware is broken"
    )
    assert deliveries == topology.DELIVERY_LIMIT
    assert runs == 0
    assert participant.dead_lettered == {"failed": 1}
    await broker.no_more_replies()


async def test_a_middleware_that_fails_or_skips_call_next_gets_the_command_again(
    make_participant: ParticipantFactory, broker: Broker
) -> None:
    action = _action("orders.create")
    redelivered: list[bool] = []

    twice: list[str] = []

    async def flaky(delivery: Delivery, call_next: CallNext) -> None:
        redelivered.append(bool(delivery.message.redelivered))
        if len(redelivered) == 1:
            raise RuntimeError("first delivery")  # before call_next(): requeued
        if len(redelivered) == 2:
            return  # without call_next(): not processed, so requeued too
        await call_next()
        if len(redelivered) == 3:
            raise RuntimeError("third delivery")  # after the commit: requeued
        try:
            await call_next()  # the fourth: replayed; a second call is refused
        except RuntimeError as exc:
            twice.append(str(exc))

    participant = make_participant(middleware=[flaky])
    runs = 0

    @participant.step(action)
    async def create(ctx: StepContext) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {"runs": runs}

    await participant.start()
    await broker.send(action=action, saga_id=_uid(), step_id=_uid())
    replies = [await broker.reply(), await broker.reply()]
    # The third delivery committed (then was requeued); the fourth replayed the outcome.
    assert [structs.to_dict(r.output) for r in replies] == [{"runs": 1}, {"runs": 1}]
    assert runs == 1
    await asyncio.sleep(0.2)  # the fourth delivery's middleware returned and it was acked
    assert redelivered == [False, True, True, True]
    assert twice == ["call_next() called twice for one delivery"]
    assert participant.dead_lettered == {}
    assert await broker.queue_depth(participant.service) == 0
    await broker.no_more_replies()


def test_middleware_must_be_callable(amqp_url: str, database_url: str) -> None:
    from sagaplane import ConfigurationError

    with pytest.raises(ConfigurationError):
        Participant(
            "svc",
            amqp_url=amqp_url,
            database_url=database_url,
            middleware=[object()],  # type: ignore[list-item]
        )
