"""Signed steps (issue 17, item 3): with signing keys, anyone on the vhost can still read
a command, token included, but cannot complete the step or make a participant run one.

A spy binds its own queue to ``sagaplane.commands`` with the vhost's credentials, as any
client of the broker could, and answers with the right token: unsigned, signed with a
wrong key, or validly signed by another service, the reply is dead-lettered and the step
does not move. A forged compensation command published to a participant is not run.
Key rotation: two keys accept both, then only the new one.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from google.protobuf import duration_pb2

from coordinator.app import Coordinator
from coordinator.config import ConfigError
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from helpers.shop import wait_terminal
from sagaplane import Participant, StepContext, signing, structs, topology, wire
from sagaplane.consuming import QUEUE_HEADER, REASON_HEADER
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc, messages_pb2
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub

OLD, NEW, OTHER = (secrets.token_hex(32) for _ in range(3))
PAY_QUEUE = topology.participant_queue("pay")


def _keys_file(tmp_path: Path, pay: list[str]) -> str:
    path = tmp_path / f"signing-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps({"pay": pay, "other": [OTHER]}))
    return str(path)


@asynccontextmanager
async def _coordinator(
    database_url: str, amqp_url: str, keys_file: str
) -> AsyncIterator[tuple[Coordinator, Stub]]:
    settings = coordinator_settings(database_url, amqp_url, signing_keys=keys_file)
    async with (
        Coordinator(settings) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield running, coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain client of the test's vhost, with its credentials (what anyone on it has)."""
    connection = await aio_pika.connect(
        amqp_url, client_properties={"connection_name": "test:signing"}
    )
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture
async def pay_database() -> AsyncIterator[str]:
    name = unique_name("sagaplane_pay")
    await create_database(name)
    yield server_url(name)
    await drop_database(name)


class Pay:
    """The ``pay`` service: what its handlers ran, by action."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []

    def participant(self, amqp_url: str, database_url: str, keys: str) -> Participant:
        p = Participant(
            "pay",
            amqp_url=amqp_url,
            database_url=database_url,
            signing_keys=keys,
            relay_poll_interval=0.1,
        )

        @p.step("pay.charge")
        async def charge(ctx: StepContext) -> dict[str, Any]:
            self.ran.append(("pay.charge", ctx.saga_id))
            return {"charged": True}

        @p.compensation("pay.refund")
        async def refund(ctx: StepContext) -> dict[str, Any]:
            self.ran.append(("pay.refund", ctx.saga_id))
            return {}

        return p


def _order(name: str = "order") -> api.StartSagaRequest:
    return api.StartSagaRequest(
        name=name,
        steps=[
            api.StepSpec(
                name="charge",
                action="pay.charge",
                compensation="pay.refund",
                # Long enough that no retry (a new token) comes while the test answers.
                timeout=duration_pb2.Duration(seconds=300),
            )
        ],
    )


async def _spy(channel: AbstractChannel) -> AbstractQueue:
    """A queue of the test's own, bound to every command (``#``)."""
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    queue = await channel.declare_queue("", exclusive=True)
    await queue.bind(commands, routing_key="#")
    return queue


async def _next(queue: AbstractQueue) -> AbstractIncomingMessage:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    pytest.fail(f"nothing arrived on {queue.name}")


async def _dead_letters(channel: AbstractChannel, want: set[str]) -> dict[str, dict[str, Any]]:
    """Drain the dead-letter queue until every id in ``want`` arrived; id -> headers."""
    queue = await channel.get_queue(topology.DEAD_LETTER_QUEUE)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 15
    while not want <= found.keys() and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        elif message.message_id is not None:
            found[message.message_id] = dict(message.headers or {})
    assert want <= found.keys(), f"not dead-lettered: {want - found.keys()}"
    return found


def _reply_to(command: messages_pb2.StepCommand) -> bytes:
    return messages_pb2.StepReply(
        saga_id=command.saga_id,
        step_id=command.step_id,
        attempt=command.attempt,
        kind=command.kind,
        token=command.token,  # the right token, read off the broker
        outcome=messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        output=structs.to_struct({"forged": True}),
    ).SerializeToString()


async def _publish_reply(
    channel: AbstractChannel, message_id: str, body: bytes, headers: dict[str, Any]
) -> None:
    replies = await channel.get_exchange(topology.REPLIES_EXCHANGE)
    await replies.publish(
        aio_pika.Message(body, message_id=message_id, type=wire.REPLY_TYPE, headers=headers),
        routing_key=topology.REPLIES_ROUTING_KEY,
    )


async def _step(stub: Stub, saga_id: str) -> model.Step:
    return (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga.steps[0]


async def test_a_reply_without_a_valid_signature_does_not_move_the_step(
    database_url: str, amqp_url: str, channel: AbstractChannel, tmp_path: Path
) -> None:
    keys = _keys_file(tmp_path, [OLD])
    async with _coordinator(database_url, amqp_url, keys) as (coordinator, stub):
        spy = await _spy(channel)
        saga = (await stub.StartSaga(_order())).saga
        taken = await _next(spy)
        command = wire.decode_command(taken.body, taken.type)
        assert command.token and taken.headers and signing.SIGNATURE_HEADER in taken.headers

        body = _reply_to(command)
        mine = signing.reply_headers
        forged = {
            "unsigned": {},
            "wrong-key": mine([bytes.fromhex(NEW)], "pay", message_id="wrong-key", body=body),
            "bad-hex": {signing.SIGNER_HEADER: "pay", signing.SIGNATURE_HEADER: "zz"},
            "no-such-service": mine([bytes.fromhex(OLD)], "nobody", message_id="x", body=body),
            # A valid signature of another service: it does not own pay.charge.
            "other-service": mine(
                [bytes.fromhex(OTHER)], "other", message_id="other-service", body=body
            ),
            # The right key, but over another message id (a replayed copy).
            "replayed": mine([bytes.fromhex(OLD)], "pay", message_id="original", body=body),
        }
        for message_id, headers in forged.items():
            await _publish_reply(channel, message_id, body, headers)
        dead = await _dead_letters(channel, set(forged))
        for message_id, headers in dead.items():
            assert headers[QUEUE_HEADER] == topology.REPLIES_QUEUE
            want = "does not own action 'pay.charge'" if message_id == "other-service" else ""
            assert str(headers[REASON_HEADER]).startswith("refused" if want else "signature: ")
            assert want in str(headers[REASON_HEADER])
        assert "not signed" in str(dead["unsigned"][REASON_HEADER])
        assert coordinator.dead_lettered.get("signature") == 5
        assert coordinator.dead_lettered.get("refused") == 1
        step = await _step(stub, saga.id)
        assert step.status == model.STEP_STATUS_STARTED and not step.HasField("output")

        # The owner's signature, and the step moves.
        genuine = mine([bytes.fromhex(OLD)], "pay", message_id="genuine", body=body)
        await _publish_reply(channel, "genuine", body, genuine)
        done = await wait_terminal(stub, [saga.id])
        assert done[saga.id].state == model.SAGA_STATE_COMPLETED
        assert structs.decode(done[saga.id].steps[0].output, "output") == {"forged": True}


async def test_a_forged_compensation_command_is_not_run(
    database_url: str,
    amqp_url: str,
    pay_database: str,
    channel: AbstractChannel,
    tmp_path: Path,
) -> None:
    pay = Pay()
    keys = _keys_file(tmp_path, [OLD])
    async with (
        _coordinator(database_url, amqp_url, keys) as (coordinator, stub),
        pay.participant(amqp_url, pay_database, OLD) as participant,
    ):
        # Signed both ways, a saga runs as before.
        saga = (await stub.StartSaga(_order())).saga
        done = await wait_terminal(stub, [saga.id])
        assert done[saga.id].state == model.SAGA_STATE_COMPLETED
        assert pay.ran == [("pay.charge", saga.id)]

        # An undo of that completed step, as anyone on the vhost could publish it.
        step = done[saga.id].steps[0]
        forged = messages_pb2.StepCommand(
            saga_id=saga.id,
            step_id=step.id,
            step_name="charge",
            saga_name="order",
            attempt=1,
            kind=messages_pb2.COMMAND_KIND_COMPENSATE,
            action="pay.refund",
            token="made-up",
        ).SerializeToString()
        bad_key = signing.sign(
            [bytes.fromhex(NEW)],
            signer=signing.COORDINATOR,
            message_type=wire.COMMAND_TYPE,
            routing_key="pay.refund",
            message_id="forged-wrong-key",
            body=forged,
        )
        commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        for message_id, headers in (
            ("forged-unsigned", {}),
            ("forged-wrong-key", {signing.SIGNATURE_HEADER: bad_key}),
        ):
            await commands.publish(
                aio_pika.Message(
                    forged, message_id=message_id, type=wire.COMMAND_TYPE, headers=headers
                ),
                routing_key="pay.refund",
            )
        dead = await _dead_letters(channel, {"forged-unsigned", "forged-wrong-key"})
        for headers in dead.values():
            assert headers[QUEUE_HEADER] == PAY_QUEUE
            assert str(headers[REASON_HEADER]).startswith("signature: ")
        assert participant.dead_lettered.get("signature") == 2
        assert pay.ran == [("pay.charge", saga.id)]  # the refund never ran
        assert coordinator.dead_lettered.get("signature") is None


async def test_rotation_accepts_both_keys_then_only_the_new_one(
    database_url: str,
    amqp_url: str,
    pay_database: str,
    channel: AbstractChannel,
    tmp_path: Path,
) -> None:
    pay = Pay()
    both = _keys_file(tmp_path, [OLD, NEW])  # still signs with the old key
    async with _coordinator(database_url, amqp_url, both) as (_, stub):
        # A participant still on the old key, then one that signs with the new one.
        for keys in (OLD, f"{NEW},{OLD}"):
            async with pay.participant(amqp_url, pay_database, keys):
                saga = (await stub.StartSaga(_order())).saga
                done = await wait_terminal(stub, [saga.id])
                assert done[saga.id].state == model.SAGA_STATE_COMPLETED, keys

    new_only = _keys_file(tmp_path, [NEW])
    async with _coordinator(database_url, amqp_url, new_only) as (coordinator, stub):
        async with pay.participant(amqp_url, pay_database, NEW):
            saga = (await stub.StartSaga(_order())).saga
            done = await wait_terminal(stub, [saga.id])
            assert done[saga.id].state == model.SAGA_STATE_COMPLETED

        # A reply signed with the old key no longer applies.
        spy = await _spy(channel)
        saga = (await stub.StartSaga(_order())).saga
        taken = await _next(spy)
        body = _reply_to(wire.decode_command(taken.body, taken.type))
        old = signing.reply_headers([bytes.fromhex(OLD)], "pay", message_id="old-key", body=body)
        await _publish_reply(channel, "old-key", body, old)
        dead = await _dead_letters(channel, {"old-key"})
        assert str(dead["old-key"][REASON_HEADER]).startswith("signature: ")
        assert (await _step(stub, saga.id)).status == model.STEP_STATUS_STARTED

        # Nor does a participant left on the old key run the new key's commands.
        async with pay.participant(amqp_url, pay_database, OLD) as stale:
            assert taken.message_id is not None
            dead = await _dead_letters(channel, {taken.message_id})
            assert dead[taken.message_id][QUEUE_HEADER] == PAY_QUEUE
            assert str(dead[taken.message_id][REASON_HEADER]).startswith("signature: ")
            assert stale.dead_lettered.get("signature") == 1
        assert coordinator.dead_lettered.get("signature") == 1
        assert (await _step(stub, saga.id)).status == model.STEP_STATUS_STARTED
    assert [action for action, _ in pay.ran] == ["pay.charge"] * 3


async def test_a_coordinator_with_a_bad_keys_file_does_not_start(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("pay: [abcd]\n")
    settings = coordinator_settings(database_url, amqp_url, signing_keys=str(path))
    with pytest.raises(ConfigError, match=r"keys.yaml: pay: a signing key must be at least 32"):
        async with Coordinator(settings):
            pass
