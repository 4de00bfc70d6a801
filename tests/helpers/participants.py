"""Driving a participant the way the coordinator does, without one: StepCommands
published to ``sagaplane.commands``, replies read from a private queue bound to
``sagaplane.replies`` (:class:`Broker`, :func:`open_broker`); participants made for a
test and stopped after it (:func:`participants`).

It also holds the fixtures a module driving participants needs: ``broker``,
``make_participant`` and ``db``, over the module's own ``participant_url`` (the
participants' database) and ``amqp_url`` fixtures. Import them into the test module
(and name them in its ``__all__``) to use them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import psycopg
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import Participant, structs, topology
from sagaplane.consuming import REASON_HEADER
from sagaplane.v1 import messages_pb2

WAIT = 15.0
"""Seconds to wait for something that should happen within milliseconds."""

EXECUTE = messages_pb2.COMMAND_KIND_EXECUTE
COMPENSATE = messages_pb2.COMMAND_KIND_COMPENSATE
SUCCEEDED = messages_pb2.REPLY_OUTCOME_SUCCEEDED
FAILED = messages_pb2.REPLY_OUTCOME_FAILED


def uid() -> str:
    """A short unique name part."""
    return uuid.uuid4().hex[:12]


@dataclass
class Broker:
    """The test's own AMQP connection: publishes commands, collects replies."""

    connection: AbstractConnection
    channel: AbstractChannel
    replies: asyncio.Queue[tuple[messages_pb2.StepReply, AbstractIncomingMessage]] = field(
        default_factory=asyncio.Queue
    )

    async def send(
        self,
        *,
        action: str,
        saga_id: str,
        step_id: str,
        attempt: int = 1,
        kind: messages_pb2.CommandKind.ValueType = EXECUTE,
        token: str = "",
        input: dict[str, Any] | None = None,
        output: dict[str, Any] | None = None,
        timeout: float | None = None,
        deadline: datetime | None = None,
    ) -> str:
        """Publish a StepCommand as the coordinator's codec does; returns its message_id.

        With ``timeout`` (seconds), the command carries that attempt deadline: at
        ``deadline`` (aware), by default ``timeout`` from now, as the coordinator
        counts it from dispatch.
        """
        command = messages_pb2.StepCommand(
            saga_id=saga_id,
            step_id=step_id,
            step_name=f"step-{step_id}",
            saga_name="test.saga",
            attempt=attempt,
            kind=kind,
            action=action,
            input=structs.to_struct(input),
            context=structs.to_struct({"customer": "c-1"}),
            token=token or uid(),
        )
        if output is not None:
            command.output.CopyFrom(structs.to_struct(output))
        if timeout is not None:
            command.timeout.FromTimedelta(timedelta(seconds=timeout))
            command.deadline.FromDatetime(
                deadline or datetime.now(UTC) + timedelta(seconds=timeout)
            )
        kind_name = "execute" if kind == EXECUTE else "compensate"
        message_id = f"{step_id}:{kind_name}:{attempt}"
        await self.publish_raw(
            action, command.SerializeToString(), message_id=message_id, token=command.token
        )
        return message_id

    async def publish_raw(
        self, routing_key: str, body: bytes, *, message_id: str, **_: Any
    ) -> None:
        """Publish any body to the commands exchange (persistent, confirmed)."""
        exchange = await self.channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                type=messages_pb2.StepCommand.DESCRIPTOR.full_name,
                content_type=topology.CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
        )

    async def reply(self) -> messages_pb2.StepReply:
        """The next reply (fails the test after WAIT seconds)."""
        async with asyncio.timeout(WAIT):
            reply, _ = await self.replies.get()
        return reply

    async def reply_message(self) -> tuple[messages_pb2.StepReply, AbstractIncomingMessage]:
        """The next reply with its AMQP message."""
        async with asyncio.timeout(WAIT):
            return await self.replies.get()

    async def no_more_replies(self, wait: float = 0.5) -> None:
        """Assert that nothing else arrives within ``wait`` seconds."""
        await asyncio.sleep(wait)
        assert self.replies.empty(), "unexpected extra reply"

    async def dead_letter(self, message_id: str) -> bytes:
        """The body of ``message_id`` once it is in the dead-letter queue."""
        return (await self._dead_message(message_id)).body

    async def dead_letter_reason(self, message_id: str) -> str:
        """Why ``message_id`` was dead-lettered, once it is in the dead-letter queue."""
        message = await self._dead_message(message_id)
        return str((message.headers or {}).get(REASON_HEADER))

    async def _dead_message(self, message_id: str) -> AbstractIncomingMessage:
        queue = await self.channel.get_queue(topology.DEAD_LETTER_QUEUE, ensure=False)
        async with asyncio.timeout(WAIT):
            while True:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                elif message.message_id == message_id:
                    return message

    async def queue_depth(self, service: str) -> int:
        """Ready messages in the participant's queue."""
        queue = await self.channel.declare_queue(topology.participant_queue(service), passive=True)
        return queue.declaration_result.message_count or 0


@asynccontextmanager
async def open_broker(amqp_url: str, name: str) -> AsyncIterator[Broker]:
    """An AMQP connection named ``name`` (it shows in the broker), with a private
    replies queue; closed on exit."""
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": name})
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_core(channel)
        broker = Broker(connection=connection, channel=channel)
        replies_exchange = await channel.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(replies_exchange, routing_key=topology.REPLIES_ROUTING_KEY)

        async def collect(message: AbstractIncomingMessage) -> None:
            reply = messages_pb2.StepReply()
            reply.ParseFromString(message.body)
            await broker.replies.put((reply, message))
            await message.ack()

        await queue.consume(collect)
        yield broker
    finally:
        await connection.close()


@asynccontextmanager
async def participant_database(prefix: str, tables: str) -> AsyncIterator[str]:
    """A fresh database named after ``prefix``, with ``tables`` (SQL statements) created
    for the handlers; yields its URL, dropped on exit."""
    name = unique_name(prefix)
    await create_database(name)
    try:
        async with await psycopg.AsyncConnection.connect(server_url(name), autocommit=True) as c:
            await c.execute(tables.encode())
        yield server_url(name)
    finally:
        await drop_database(name)


ParticipantFactory = Callable[..., Participant]
"""``make(**kwargs)``: an unstarted Participant (kwargs as Participant's)."""


@asynccontextmanager
async def participants(amqp_url: str, database_url: str) -> AsyncIterator[ParticipantFactory]:
    """Makes unstarted participants with a unique service name (a fast relay poll unless
    given); stops every one of them on exit."""
    made: list[Participant] = []

    def make(**kwargs: Any) -> Participant:
        kwargs.setdefault("relay_poll_interval", 0.2)
        participant = Participant(
            f"svc-{uid()}", amqp_url=amqp_url, database_url=database_url, **kwargs
        )
        made.append(participant)
        return participant

    try:
        yield make
    finally:
        for participant in made:
            await participant.stop()


@pytest.fixture
async def broker(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """The test's AMQP connection (named after the test), with a private replies queue."""
    async with open_broker(amqp_url, f"test:{request.node.name}") as broker:
        yield broker


@pytest.fixture
async def make_participant(
    amqp_url: str, participant_url: str
) -> AsyncIterator[ParticipantFactory]:
    """Unstarted participants with a unique service name; each is stopped at teardown."""
    async with participants(amqp_url, participant_url) as make:
        yield make


@pytest.fixture
async def db(participant_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection to the participants' database, for assertions."""
    async with await psycopg.AsyncConnection.connect(participant_url, autocommit=True) as conn:
        yield conn
