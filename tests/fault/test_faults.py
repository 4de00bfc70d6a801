"""Faults of sagaplane's own processes and of the messages between them (issue 5).

Each test starts a batch of sagas under load (every fourth order is over the payment
limit, so compensations run too), injects its fault, drains, and counts (see
:mod:`fault.harness`); every count but started and terminal must be 0. The faults
that restart PostgreSQL or RabbitMQ are in ``test_service_restarts.py``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter, defaultdict
from typing import Any

import aio_pika
import psycopg
import pytest

from fault.harness import (
    CHAOS_EXCHANGE,
    HeldReply,
    ReplyForwarder,
    Rig,
    StepDef,
    retry_policy,
    saga_request,
)
from helpers.broker import rabbitmqctl
from sagaplane import structs, topology
from sagaplane.client import Resolution
from sagaplane.consuming import REASON_HEADER
from sagaplane.sagas import RetryPolicy, SagaState, StepStatus
from sagaplane.v1 import messages_pb2

pytestmark = [pytest.mark.fault]

COORDINATOR_KILLS = 10
PARTICIPANT_KILLS = 4
"""At most 4: each kill returns every unacked command, and the queues dead-letter a
command on its 6th delivery (a poison message must not loop forever)."""

# Reply faults need timeouts that fire during the test: 1s per attempt, quick retries.
SHORT: dict[str, Any] = {
    "step_timeout": 1.0,
    "retry": retry_policy(6, 0.05, 1.5, 0.3),
    "compensation_retry": retry_policy(10, 0.05, 1.5, 0.3),
}


@pytest.mark.parametrize("shape", ["line", "graph"])
async def test_coordinator_sigkill(rig: Rig, shape: str) -> None:
    """The coordinator SIGKILLed at random moments under load, 10 times, restarted each
    time; sagas in a line, or as graphs (fan-out 3, then a join)."""
    rig.graph = shape == "graph"
    await rig.start_coordinator()
    await rig.start_participants()
    kills_done = asyncio.Event()

    async def killer() -> None:
        for _ in range(COORDINATOR_KILLS):
            await asyncio.sleep(random.uniform(0.1, 1.2))
            await rig.coordinator.kill()
            await asyncio.sleep(random.uniform(0.0, 0.3))
            await rig.coordinator.start()
        kills_done.set()

    load = rig.spawn(
        rig.load(minimum=40, maximum=150, until=kills_done, workers=3, pause=(0.1, 0.5))
    )
    await killer()
    await load
    rig.notes.append(
        f"coordinator SIGKILLed {rig.coordinator.kills}x and restarted; "
        f"{rig.retried_calls} client calls repeated"
    )
    totals = await rig.tally()

    assert rig.coordinator.kills == COORDINATOR_KILLS
    assert totals.ok, rig.report(totals)
    rig.assert_alive()


async def test_amqp_connections_force_closed(rig: Rig) -> None:
    """Every AMQP connection of the run (coordinator, participants, their relays) closed by
    the broker under load, twice: all of them reconnect and resume consuming. (The
    RabbitMQ restart of ``test_service_restarts.py`` without stopping the shared broker.)"""
    await rig.start_coordinator()
    await rig.start_participants()
    vhost = rig.amqp_url.rsplit("/", 1)[1]
    closed = asyncio.Event()
    load = rig.spawn(rig.load(minimum=40, maximum=120, until=closed))
    for _ in range(2):
        await asyncio.sleep(random.uniform(0.5, 2.0))
        await rabbitmqctl("close_all_connections", "-p", vhost, "fault suite")
    await asyncio.sleep(1.0)
    closed.set()
    await load
    rig.notes.append("every AMQP connection of the run force-closed by the broker, 2x")
    totals = await rig.tally()

    assert totals.ok, rig.report(totals)
    rig.assert_alive()


async def test_participant_sigkill_between_commit_and_ack(rig: Rig) -> None:
    """A participant SIGKILLs itself after a command's transaction committed, before the ack
    (``FAULT_KILL_AFTER_COMMITS``); restarted, it gets the command again and its inbox
    answers without a second effect."""
    await rig.start_coordinator()
    others = rig.participant("participants", ["orders", "payment", "flaky"])
    assert await others.start()
    victim = rig.participant("inventory", ["inventory"])
    kills_done = asyncio.Event()
    self_kills = 0
    kill_points: list[int] = []

    async def chaos() -> None:
        nonlocal self_kills
        for _ in range(PARTICIPANT_KILLS):
            kill_points.append(random.randint(2, 8))
            await victim.start(kill_after=kill_points[-1])
            assert victim.proc is not None
            async with asyncio.timeout(90):
                code = await victim.proc.wait()
            assert code == -signal.SIGKILL, f"inventory exited with {code}:\n{victim.tail()}"
            self_kills += 1
            await asyncio.sleep(random.uniform(0.0, 0.5))  # commands pile up meanwhile
        assert await victim.start()
        kills_done.set()

    load = rig.spawn(rig.load(minimum=40, maximum=150, until=kills_done))
    await chaos()
    await load
    rig.notes.append(
        f"inventory SIGKILLed itself {self_kills}x between commit and ack "
        f"(after commits {', '.join(map(str, kill_points))}) and was restarted"
    )
    totals = await rig.tally()

    assert self_kills == PARTICIPANT_KILLS
    assert totals.ok, rig.report(totals)
    # The killed commits' commands came again and were answered from the inbox.
    assert totals.redeliveries >= PARTICIPANT_KILLS, rig.report(totals)
    assert totals.resent >= PARTICIPANT_KILLS, rig.report(totals)
    rig.assert_alive()


async def test_every_reply_dropped_once(rig: Rig) -> None:
    """The first reply to every command is dropped: the attempt times out, the retry finds
    the outcome in the participant's inbox, and its re-sent reply carries the saga on.
    (A dropped failure is not stored as an outcome: the SDK runs a failed command again.)"""
    dropped: set[tuple[str, int]] = set()
    dropped_successes = 0

    async def drop_first(forwarder: ReplyForwarder, reply: HeldReply) -> None:
        nonlocal dropped_successes
        if reply.key not in dropped:
            dropped.add(reply.key)
            dropped_successes += reply.succeeded
            return
        await forwarder.forward(reply)

    await rig.start_coordinator()
    forwarder = ReplyForwarder(rig.amqp_url, drop_first)
    await forwarder.start()
    try:
        await rig.start_participants(reply_exchange=CHAOS_EXCHANGE)
        await rig.load(minimum=30, maximum=30, pause=(0.01, 0.05), **SHORT)
        await rig.drain()
        rig.notes.append(f"{len(dropped)} replies dropped (the first of every step/compensation)")
        totals = await rig.tally()
    finally:
        await forwarder.stop()

    assert totals.ok, rig.report(totals)
    # Every action and every compensation that ran had its first reply dropped...
    for started in rig.started.values():
        saga = await rig.get(started.saga_id)
        for step in saga.steps:
            assert step.attempts == 0 or step.attempts >= 2, (started.key, step)
            assert step.compensation_attempts == 0 or step.compensation_attempts >= 2
    # ...and the participants answered the retries of the successes from their inboxes.
    assert len(dropped) >= 30 * 3
    assert totals.resent >= dropped_successes > 0, rig.report(totals)


class Reorder:
    """Holds every reply for a random delay and releases what is due in shuffled order.
    Some first attempts' replies are held past the step timeout (the retry's reply
    overtakes them), and after every retry's reply the previous attempt's reply is
    published once more: stale replies, which the coordinator must ignore."""

    def __init__(self) -> None:
        self.copies: dict[tuple[str, int], dict[int, HeldReply]] = defaultdict(dict)
        self.pending: list[tuple[float, HeldReply]] = []
        self.held_past_timeout = 0
        self.stale_republished = 0

    async def __call__(self, forwarder: ReplyForwarder, reply: HeldReply) -> None:
        self.copies[reply.key][reply.attempt] = reply
        if reply.attempt == 1 and random.random() < 0.3:
            delay = random.uniform(1.5, 2.5)  # past the 1s step timeout
            self.held_past_timeout += 1
        else:
            delay = random.uniform(0.0, 0.5)
        self.pending.append((time.monotonic() + delay, reply))

    async def pump(self, forwarder: ReplyForwarder) -> None:
        while True:
            now = time.monotonic()
            due = [r for t, r in self.pending if t <= now]
            self.pending = [(t, r) for t, r in self.pending if t > now]
            random.shuffle(due)
            for reply in due:
                await forwarder.forward(reply)
                older = [a for a in self.copies[reply.key] if a < reply.attempt]
                if older and reply.attempt > 1:
                    stale = self.copies[reply.key][max(older)]
                    self.stale_republished += 1
                    self.pending.append((time.monotonic() + random.uniform(0.05, 0.3), stale))
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("shape", ["line", "graph"])
async def test_replies_delayed_reordered_and_stale(rig: Rig, shape: str) -> None:
    """Replies delayed, shuffled, overtaken by their retry's reply, and republished stale
    (duplicated); sagas in a line, or as graphs (fan-out 3, then a join)."""
    rig.graph = shape == "graph"
    reorder = Reorder()
    await rig.start_coordinator()
    forwarder = ReplyForwarder(rig.amqp_url, reorder)
    await forwarder.start()
    pump = asyncio.create_task(reorder.pump(forwarder))
    try:
        await rig.start_participants(reply_exchange=CHAOS_EXCHANGE)
        await rig.load(minimum=40, maximum=40, pause=(0.01, 0.1), **SHORT)
        await rig.drain()
        await asyncio.sleep(1.0)  # the last stale copies
        rig.notes.append(
            f"{forwarder.forwarded} replies forwarded shuffled after 0-0.5s; "
            f"{reorder.held_past_timeout} held 1.5-2.5s (past the 1s timeout); "
            f"{reorder.stale_republished} stale copies re-published after the newer attempt"
        )
        totals = await rig.tally()
    finally:
        pump.cancel()
        await forwarder.stop()

    assert totals.ok, rig.report(totals)
    assert reorder.held_past_timeout > 0 and reorder.stale_republished > 0
    # Fencing: no stale reply moved a step twice.
    for started in rig.started.values():
        saga = await rig.get(started.saga_id, history=True)
        moves = Counter(
            (h.step_name, h.event)
            for h in saga.history
            if h.event in ("step_completed", "step_failed", "step_compensated")
        )
        assert max(moves.values()) == 1, (started.key, moves)


def _flaky_steps(mode: str) -> list[StepDef]:
    return [
        StepDef("create", "orders.create", "orders.delete", {"sku": "book", "qty": 1}),
        StepDef("hold", "flaky.hold", "flaky.release", {"mode": mode}),
        StepDef("charge", "payment.charge", "payment.refund", {"amount": 5000}),
    ]


async def test_compensation_failures_retried_and_resolved(rig: Rig) -> None:
    """A compensation failing 3 times then succeeding; compensations failing for good
    (non-retryably, or by exhausting their attempts) stop in COMPENSATION_FAILED, stay
    in ListActive, and are resolved by ResolveCompensation (MARK_COMPENSATED; RETRY
    once the participant is fixed)."""
    await rig.start_coordinator()
    await rig.start_participants()
    quick = retry_policy(10, 0.05, 1.5, 0.3)
    background = rig.spawn(rig.load(minimum=24, maximum=24, first=100))

    async def start(mode: str, n: int, policy: RetryPolicy) -> list[str]:
        ids = []
        for i in range(n):
            request = saga_request(
                f"{rig.fault}-{mode}-{i}",
                _flaky_steps(mode),
                name="fault.flaky",
                compensation_retry=policy,
            )
            ids.append((await rig.start_saga(request, SagaState.COMPENSATED)).saga_id)
        return ids

    fail3 = await start("fail3", 8, quick)
    broken = await start("broken", 4, quick)
    until_fixed = await start("until_fixed", 4, retry_policy(3, 0.05, 1.5, 0.3))

    # Failing 3 times, then succeeding: compensated, on the 4th attempt.
    for saga in (await rig.wait_states(fail3, [SagaState.COMPENSATED])).values():
        assert saga.steps[1].compensation_attempts == 4, saga
        history = (await rig.get(saga.id, history=True)).history
        assert [h.event for h in history].count("compensation_attempt_failed") == 3

    # Failing for good: COMPENSATION_FAILED, the error on the step, still active.
    failed = await rig.wait_states([*broken, *until_fixed], [SagaState.COMPENSATION_FAILED])
    for saga_id, saga in failed.items():
        hold = saga.steps[1]
        assert hold.status == StepStatus.COMPENSATION_FAILED
        assert hold.compensation_attempts == (1 if saga_id in broken else 3), hold
        assert "flaky release" in hold.error
        assert saga.steps[0].status == StepStatus.COMPLETED  # not undone yet
    await asyncio.sleep(1.0)
    assert set(failed) <= await rig.active_ids()
    # ...and stale (not updated for a while), as ListActive's stale_for filter tells.
    assert set(failed) <= await rig.active_ids(stale_for=0.5)
    for saga_id, before in failed.items():  # never loops: nothing changed meanwhile
        after = await rig.get(saga_id)
        assert after.state == SagaState.COMPENSATION_FAILED
        assert after.updated_at == before.updated_at
        assert after.steps[1].compensation_attempts == before.steps[1].compensation_attempts

    # Resolved by a person: by hand for the broken ones...
    for saga_id in broken:
        await rig.rpc(
            lambda c, saga_id=saga_id: c.resolve_compensation(
                saga_id, Resolution.MARK_COMPENSATED, "fault suite: hold released by hand"
            )
        )
    # ...and by a retry once the participant is fixed.
    async with await psycopg.AsyncConnection.connect(rig.service_urls["flaky"]) as conn:
        for saga_id in until_fixed:
            await conn.execute("INSERT INTO fault_fixed (saga_id) VALUES (%s)", (saga_id,))
        await conn.commit()
    for saga_id in until_fixed:
        await rig.rpc(
            lambda c, saga_id=saga_id: c.resolve_compensation(
                saga_id, Resolution.RETRY, "fault suite: flaky service fixed"
            )
        )
    resolved = await rig.wait_states([*broken, *until_fixed], [SagaState.COMPENSATED])
    for saga_id in [*broken, *until_fixed]:
        saga = await rig.get(saga_id, history=True)
        event, reason = (
            ("compensation_resolved_mark_compensated", "hold released by hand")
            if saga_id in broken
            else ("compensation_resolved_retry", "flaky service fixed")
        )
        entries = [h for h in saga.history if h.event == event]
        assert len(entries) == 1 and reason in entries[0].reason, saga.history
        assert saga.steps[1].status == StepStatus.COMPENSATED
        assert saga.steps[0].status == StepStatus.COMPENSATED
        if saga_id in until_fixed:
            assert resolved[saga_id].steps[1].compensation_attempts == 4

    await background
    rig.notes.append(
        f"{len(fail3)} compensations failed 3x then succeeded; {len(broken)} failed "
        f"non-retryably -> MARK_COMPENSATED; {len(until_fixed)} exhausted 3 attempts -> "
        "fixed + RETRY"
    )
    totals = await rig.tally()
    assert totals.ok, rig.report(totals)
    rig.assert_alive()


def _reply(saga_id: str, step_id: str, **kw: object) -> bytes:
    reply = messages_pb2.StepReply(
        saga_id=saga_id,
        step_id=step_id,
        attempt=1,
        kind=messages_pb2.COMMAND_KIND_EXECUTE,
        token="forged",
        **kw,  # type: ignore[arg-type]
    )
    return reply.SerializeToString()


def _command(saga_id: str, step_id: str, action: str) -> bytes:
    return messages_pb2.StepCommand(
        saga_id=saga_id,
        step_id=step_id,
        step_name="poison",
        saga_name="fault.poison",
        attempt=1,
        kind=messages_pb2.COMMAND_KIND_EXECUTE,
        action=action,
        input=structs.to_struct({"position": 0}),
        token="forged",
    ).SerializeToString()


async def test_poison_messages_dead_lettered(rig: Rig) -> None:
    """Malformed, unknown-saga and consumer-crashing messages published straight to the
    replies queue and to a participant's queue end in the dead-letter queue; the sagas
    running meanwhile are not disturbed."""
    await rig.start_coordinator()
    await rig.start_participants()
    load = rig.spawn(rig.load(minimum=40, maximum=40, pause=(0.02, 0.15)))
    unknown_saga = "01J0000000000000000000FAKE"
    reply_type = messages_pb2.StepReply.DESCRIPTOR.full_name
    command_type = messages_pb2.StepCommand.DESCRIPTOR.full_name
    succeeded = {"outcome": messages_pb2.REPLY_OUTCOME_SUCCEEDED}
    replies_queue = topology.REPLIES_QUEUE
    orders_queue = topology.participant_queue("orders")
    poison = [
        # (message id, queue, type, body)
        ("poison-reply-garbage", replies_queue, reply_type, b"\xff\xfe not protobuf \x00"),
        ("poison-reply-no-outcome", replies_queue, reply_type, _reply(unknown_saga, "s1")),
        (
            "poison-reply-unknown-saga",
            replies_queue,
            reply_type,
            _reply(unknown_saga, "01J0000000000000000000STEP", **succeeded),
        ),
        # Used to crash the reply consumer (PostgreSQL text cannot hold NUL) on every
        # delivery; now refused at once, with the reason.
        (
            "poison-reply-nul",
            replies_queue,
            reply_type,
            _reply("01J00000000000000000\x00NUL", "s1", **succeeded),
        ),
        ("poison-cmd-garbage", orders_queue, command_type, b"\x08\x96\x01\xff\xff"),
        ("poison-cmd-wrong-type", orders_queue, reply_type, _command("s", "t", "orders.create")),
        # Well-formed, for an action the participant has no handler for: answered with
        # a non-retryable NoHandler failure (for a saga the coordinator never heard of,
        # so that reply is dead-lettered).
        (
            "poison-cmd-unknown-action",
            orders_queue,
            command_type,
            _command(unknown_saga, "01J0000000000000000000STP2", "orders.explode"),
        ),
        # Used to crash the participant's handling (NUL again); refused at once too.
        (
            "poison-cmd-nul",
            orders_queue,
            command_type,
            _command(unknown_saga, "01J00000000000000\x00STP3", "orders.create"),
        ),
        # Well-formed, for a saga the coordinator never heard of: the participant runs
        # it (it cannot know), and its reply is what gets dead-lettered.
        (
            "poison-cmd-unknown-saga",
            orders_queue,
            command_type,
            _command(unknown_saga, "01J0000000000000000000STP4", "orders.create"),
        ),
    ]
    answered = {"poison-cmd-unknown-saga", "poison-cmd-unknown-action"}
    expected_dead = {mid for mid, *_ in poison if mid not in answered}
    expected_dead.add("01J0000000000000000000STP4:execute:1:reply")
    expected_dead.add("01J0000000000000000000STP2:execute:1:reply")

    connection = await aio_pika.connect_robust(rig.amqp_url)
    dead: dict[str, str] = {}
    try:
        channel = await connection.channel(publisher_confirms=True)
        for message_id, queue, message_type, body in poison:
            await asyncio.sleep(random.uniform(0.05, 0.3))  # among the healthy traffic
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=message_id,
                    type=message_type,
                    content_type=topology.CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )
        await load
        await rig.drain()

        dead_letters = await channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
        deadline = time.monotonic() + 60
        while not expected_dead <= set(dead) and time.monotonic() < deadline:
            message = await dead_letters.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            headers = message.headers or {}
            if REASON_HEADER in headers:
                dead[message.message_id or ""] = f"sagaplane: {headers[REASON_HEADER]}"
            else:  # dead-lettered by the broker (x-death says why)
                deaths = headers.get("x-death") or [{}]
                dead[message.message_id or ""] = str(deaths[0].get("reason", "?"))  # type: ignore[union-attr,index]
        reasons = Counter(r.split(":")[0] for r in dead.values())
        rig.notes.append(
            f"{len(poison)} poison messages -> {len(dead)} dead letters ("
            + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
            + ")"
        )
        totals = await rig.tally()
    finally:
        await connection.close()

    assert totals.ok, rig.report(totals)
    assert expected_dead <= set(dead), f"not dead-lettered: {expected_dead - set(dead)}"
    # Every one went at once, dead-lettered by its consumer with the reason, none after
    # burning the queue's delivery limit.
    assert all(dead[mid].startswith("sagaplane: ") for mid in expected_dead), dead
    assert "saga_id is not a saga id" in dead["poison-reply-nul"], dead
    assert "step_id contains a NUL character" in dead["poison-cmd-nul"], dead
    assert "not a StepReply" in dead["poison-reply-garbage"], dead
    assert "poison-cmd-unknown-action" not in dead, dead
    assert "not found" in dead["01J0000000000000000000STP2:execute:1:reply"], dead
    assert "not found" in dead["01J0000000000000000000STP4:execute:1:reply"], dead
    rig.assert_alive()
