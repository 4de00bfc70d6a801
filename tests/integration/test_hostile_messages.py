"""Malformed replies and commands published among real sagas: random bytes, wrong types,
non-finite numbers, NUL characters, oversized bodies, valid-looking envelopes that name
an unknown step or carry a wrong token.

The coordinator and the participants never stop, every real saga completes without
waiting out a timeout, each bad message is dead-lettered alone with its reason, and no
healthy message is dead-lettered.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.app import Coordinator
from helpers.shop import Shop, order_request, shop, shop_databases, wait_terminal
from sagaplane import structs, topology, wire
from sagaplane.consuming import QUEUE_HEADER, REASON_HEADER
from sagaplane.limits import MAX_MESSAGE_BYTES
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc, messages_pb2
from sagaplane.v1 import saga_pb2 as model

__all__ = ["shop", "shop_databases"]  # fixtures, imported for pytest

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub
REPLY_TYPE = messages_pb2.StepReply.DESCRIPTOR.full_name
COMMAND_TYPE = messages_pb2.StepCommand.DESCRIPTOR.full_name
ORDERS = topology.participant_queue("orders")
PAYMENT = topology.participant_queue("payment")
EXECUTE = messages_pb2.COMMAND_KIND_EXECUTE
SUCCEEDED = messages_pb2.REPLY_OUTCOME_SUCCEEDED
ULID_CHARS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True)
class Stuck:
    """A saga whose first step waits for a participant that does not exist."""

    saga_id: str
    step_id: str


@dataclass(frozen=True)
class Poison:
    queue: str
    type: str
    body: bytes
    answered: tuple[str, str] | None = None
    """For a valid command the participant answers (an action it has no handler for):
    the id and queue of its reply, which the coordinator dead-letters instead (a saga
    it never heard of)."""


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": "test:hostile-messages"}
    )
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture
async def stuck(stub: Stub, shop: Shop) -> Stuck:
    saga = (
        await stub.StartSaga(
            api.StartSagaRequest(name="stuck", steps=[api.StepSpec(name="wait", action="no.one")])
        )
    ).saga
    return Stuck(saga_id=saga.id, step_id=saga.steps[0].id)


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


ulids = st.text(alphabet=ULID_CHARS, min_size=26, max_size=26)
nasty_json = st.sampled_from(
    [
        {"x": math.nan},
        {"x": -math.inf},
        {"a\x00": 1},
        {"s": "\x00"},
        {"d": _nested(22)},
    ]
)


def _reply(**fields: Any) -> bytes:
    output = fields.pop("output", None)
    reply = messages_pb2.StepReply(**fields)
    if output is not None:
        reply.output.CopyFrom(structs.to_struct(output))
    return reply.SerializeToString()


def _command(**fields: Any) -> bytes:
    payload = {k: fields.pop(k) for k in ("input", "context") if k in fields}
    command = messages_pb2.StepCommand(**fields)
    for name, value in payload.items():
        getattr(command, name).CopyFrom(structs.to_struct(value))
    return command.SerializeToString()


@st.composite
def poison(draw: st.DrawFn, stuck: Stuck) -> Poison:
    """One message that can never apply, and whose consumer must say why."""
    saga, step = stuck.saga_id, stuck.step_id
    choice = draw(st.integers(min_value=0, max_value=11))
    ok = {"outcome": SUCCEEDED, "kind": EXECUTE, "attempt": 1}
    if choice == 0:
        queue = draw(st.sampled_from([topology.REPLIES_QUEUE, ORDERS]))
        return Poison(queue, "", draw(st.binary(min_size=1, max_size=64)))
    if choice == 1:  # the right body under the wrong type
        return Poison(
            topology.REPLIES_QUEUE, COMMAND_TYPE, _reply(saga_id=saga, step_id=step, **ok)
        )
    if choice == 2:  # ids that are no ULIDs (NUL, text, empty)
        bad = draw(st.sampled_from(["01J00000000000000000\x00NUL", "x", saga + "\n"]))
        return Poison(topology.REPLIES_QUEUE, REPLY_TYPE, _reply(saga_id=bad, step_id=step, **ok))
    if choice == 3:  # output PostgreSQL or protobuf's JSON cannot hold
        body = _reply(saga_id=saga, step_id=step, output=draw(nasty_json), token="t", **ok)
        return Poison(topology.REPLIES_QUEUE, REPLY_TYPE, body)
    if choice == 4:  # a saga that does not exist
        body = _reply(saga_id=draw(ulids), step_id=draw(ulids), **ok)
        return Poison(topology.REPLIES_QUEUE, REPLY_TYPE, body)
    if choice == 5:  # a real saga, a step it does not have
        return Poison(
            topology.REPLIES_QUEUE, REPLY_TYPE, _reply(saga_id=saga, step_id=draw(ulids), **ok)
        )
    if choice == 6:  # the step in flight, a forged token
        token = draw(st.text(max_size=20))
        body = _reply(saga_id=saga, step_id=step, token=token, **ok)
        return Poison(topology.REPLIES_QUEUE, REPLY_TYPE, body)
    if choice == 7:  # no outcome, or an unknown kind
        body = _reply(saga_id=saga, step_id=step, kind=draw(st.sampled_from([0, 3, 99])))
        return Poison(topology.REPLIES_QUEUE, REPLY_TYPE, body)
    # Commands, to the participants' queues.
    base = {"saga_id": draw(ulids), "step_id": draw(ulids), "attempt": 1, "kind": EXECUTE}
    if choice == 8:
        body = _command(action="orders.create", input=draw(nasty_json), **base)
        return Poison(ORDERS, COMMAND_TYPE, body)
    if choice == 9:
        field = draw(st.sampled_from(["saga_id", "step_id"]))
        body = _command(action="orders.create", **(base | {field: "a\x00b"}))
        return Poison(ORDERS, COMMAND_TYPE, body)
    if choice == 10:  # no handler: answered with a NoHandler failure, for an unknown saga
        body = _command(action="payment.refund_everything", **base)
        reply = wire.reply_id(base["step_id"], "execute", 1)
        return Poison(PAYMENT, COMMAND_TYPE, body, answered=(reply, topology.REPLIES_QUEUE))
    body = _command(action="orders.create", saga_name="n" * 201, **base)
    return Poison(ORDERS, COMMAND_TYPE, body)


async def publish(channel: AbstractChannel, message_id: str, message: Poison) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(
            message.body,
            message_id=message_id,
            type=message.type or None,
            content_type=topology.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key=message.queue,
    )


async def dead_letters(channel: AbstractChannel, want: set[str]) -> dict[str, dict[str, Any]]:
    """Drain the dead-letter queue until ``want`` arrived (or 15 s); id -> headers."""
    queue = await channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            if want <= set(found):
                return found
            await asyncio.sleep(0.05)
            continue
        found[message.message_id or ""] = dict(message.headers or {})
    return found


async def check_round(
    stub: Stub, coordinator: Coordinator, channel: AbstractChannel, batch: list[Poison]
) -> None:
    sagas = [(await stub.StartSaga(order_request(qty=i + 1))).saga.id for i in range(3)]
    ids = {f"poison-{uuid.uuid4().hex[:12]}": message for message in batch}
    for message_id, message in ids.items():
        await publish(channel, message_id, message)
    # Well inside the 30 s step timeout: nothing waited one out.
    done = await wait_terminal(stub, sagas, timeout=15)
    assert {s.state for s in done.values()} == {model.SAGA_STATE_COMPLETED}
    want = {message.answered or (message_id, message.queue) for message_id, message in ids.items()}
    dead = await dead_letters(channel, {message_id for message_id, _ in want})
    assert set(dead) == {message_id for message_id, _ in want}, (
        "healthy messages dead-lettered, or bad ones not"
    )
    queues = dict(want)
    for message_id, headers in dead.items():
        assert headers.get(REASON_HEADER), f"{message_id} dead-lettered without a reason"
        assert headers.get(QUEUE_HEADER) == queues[message_id]
    assert all(not task.done() for task in coordinator.tasks()), "a background task ended"


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_bad_messages_are_dead_lettered_alone_while_sagas_complete(
    stub: Stub,
    coordinator: Coordinator,
    channel: AbstractChannel,
    stuck: Stuck,
    data: st.DataObject,
) -> None:
    batch = data.draw(st.lists(poison(stuck), min_size=1, max_size=6))
    await check_round(stub, coordinator, channel, batch)
    saga = (await stub.GetSaga(api.GetSagaRequest(id=stuck.saga_id))).saga
    assert saga.steps[0].status == model.STEP_STATUS_STARTED, "a forged reply was applied"


async def test_an_oversized_reply_is_dead_lettered_and_sagas_go_on(
    stub: Stub, coordinator: Coordinator, channel: AbstractChannel, stuck: Stuck
) -> None:
    huge = Poison(topology.REPLIES_QUEUE, REPLY_TYPE, b"\x00" * (MAX_MESSAGE_BYTES + 1))
    await check_round(stub, coordinator, channel, [huge])
    assert coordinator.dead_lettered.get("undecodable") == 1
