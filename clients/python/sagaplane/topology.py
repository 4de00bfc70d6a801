"""Names and declaration of the AMQP topology shared by the coordinator and every participant.

Everything here is declared idempotently, so every process may (and should) declare
what it uses at start-up, in any order. The publishers (:mod:`sagaplane.relay`) never
declare anything: they only publish, and an unroutable message is a failed publish.

The core topology (:func:`declare_core`: the exchanges, the replies and dead-letter
queues) is the coordinator's. A participant declares it too when its user may
(:func:`ensure_core`), so that it can start before the coordinator; a least-privilege
participant (``sagaplane rabbitmq-permissions``) may not, and only checks that it is
there. Its own queues it always declares.

A participant's queue is bound to exactly the actions it registers: at start, the
actions it no longer registers are unbound, so that their commands are not delivered
to a service that can only dead-letter them. AMQP cannot list a queue's bindings (only
RabbitMQ's management plugin can, and it may not be there), so the bound actions are
recorded beside the queue, in the broker that holds the bindings: the service's
bindings queue (:func:`bindings_queue`) holds one message, the JSON list of the actions
bound by the last start. A start takes that record (unacked), binds what it registers,
unbinds what the record lists beyond that, publishes the new record (confirmed), and
only then acks the old one: a start that dies half way leaves the old record in place,
and the next start reads every record it finds. Replicas of one service that register
different actions (say, during a rolling deploy that removes a handler) end with the
bindings of the last one to start. The record is published through a fanout exchange
of the same name bound to that queue only, not through the default exchange: RabbitMQ
checks a publish against the exchange alone, so the right to publish to the default
exchange is the right to put a message in every queue of the vhost, which a
least-privilege participant must not have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aio_pika import Channel, DeliveryMode, ExchangeType, Message
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity

from sagaplane.amqp import reply_text
from sagaplane.errors import TopologyMissing

log = logging.getLogger(__name__)

COMMANDS_EXCHANGE = "sagaplane.commands"
"""Topic exchange; step commands are routed by their action name."""
REPLIES_EXCHANGE = "sagaplane.replies"
"""Direct exchange for step replies; routing key :data:`REPLIES_ROUTING_KEY`."""
REPLIES_QUEUE = "sagaplane.replies"
"""The one queue all coordinator replicas consume replies from."""
REPLIES_ROUTING_KEY = "reply"
"""Routing key of every reply."""
EVENTS_EXCHANGE = "sagaplane.events"
"""Topic exchange for domain events (CloudEvents), routed by the event's type. Plain
pub/sub: an event that no queue is bound for is dropped by the broker, not an error."""
EVENT_CONTENT_TYPE = "application/cloudevents+json"
"""The content type of every event: CloudEvents' JSON format, structured content mode."""
DEAD_LETTER_EXCHANGE = "sagaplane.dead-letter"
"""Fanout exchange that receives messages that can never be processed."""
DEAD_LETTER_QUEUE = "sagaplane.dead-letter"
"""Where dead messages wait for a person."""
CONTENT_TYPE = "application/x-protobuf"
"""The content type of every message body."""

DELIVERY_LIMIT = 5
"""Deliveries of one message before the broker dead-letters it (a poison message
that crashes its consumer must not be redelivered forever)."""
MIN_BROKER_VERSION = (3, 10)
"""Quorum queues need 3.8; at-least-once dead-lettering needs 3.10."""


class UnsupportedBrokerError(RuntimeError):
    """The RabbitMQ broker is too old for sagaplane's topology (3.10 or newer is needed)."""


def participant_queue(service: str) -> str:
    """The durable queue of a participant service."""
    return f"sagaplane.participant.{service}"


def events_queue(service: str) -> str:
    """The durable queue a service consumes domain events from (see :meth:`on_event
    <sagaplane.participant.Participant.on_event>`)."""
    return f"sagaplane.events.{service}"


def bindings_queue(service: str) -> str:
    """Where a participant service records the actions its queue is bound to (see the
    module docstring); the fanout exchange that the record is published through has the
    same name."""
    return f"{participant_queue(service)}.bindings"


def events_bindings_queue(service: str) -> str:
    """Where a service records the topic patterns its events queue is bound to (as
    :func:`bindings_queue`, with an exchange of the same name)."""
    return f"{events_queue(service)}.bindings"


def work_queue_arguments() -> dict[str, Any]:
    """Arguments of every queue that a consumer works from (all but the dead-letter queue).

    Changing them makes the broker refuse to re-declare existing queues
    (``PRECONDITION_FAILED``), so treat them as part of the wire contract.
    """
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        # At-most-once (the default) drops a dead letter when the dead-letter queue
        # cannot take it; a dropped command would leave its saga waiting forever.
        "x-dead-letter-strategy": "at-least-once",
        # Required by at-least-once dead-lettering; no length limit is set, so it never fires.
        "x-overflow": "reject-publish",
    }


def dead_letter_queue_arguments() -> dict[str, Any]:
    """Arguments of :data:`DEAD_LETTER_QUEUE`: quorum, no length limit, no dead-letter
    exchange, and no ``x-delivery-limit`` of its own.

    Without one, RabbitMQ 3.x sets no delivery limit, but RabbitMQ 4.0 and later apply
    their default of 20 deliveries, after which a message of this queue (which has no
    dead-letter exchange) is dropped; 4.0 to 4.2 count every return to the queue, so
    every ``sagaplane dlq list`` (:mod:`coordinator.cli.dlq` says what each version
    counts). These arguments cannot simply gain ``x-delivery-limit``: the broker refuses
    to redeclare an existing queue with another value (``PRECONDITION_FAILED``, checked on
    RabbitMQ 3.10), and RabbitMQ 3.x reads the "unlimited" -1 of 4.x as 0, dropping each
    message at its first return. On 4.0 to 4.2, lift the limit with a policy instead
    (README, Operations: dead letters).
    """
    return {"x-queue-type": "quorum"}


async def declare_core(channel: AbstractChannel) -> None:
    """Declare the exchanges, the replies queue and the dead-letter queue (idempotent).

    Raises :class:`UnsupportedBrokerError` when the broker reports a version older than
    :data:`MIN_BROKER_VERSION`.
    """
    await _check_broker(channel)
    await channel.declare_exchange(COMMANDS_EXCHANGE, ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True)
    replies = await channel.declare_exchange(REPLIES_EXCHANGE, ExchangeType.DIRECT, durable=True)
    dead = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments=dead_letter_queue_arguments()
    )
    await dead_queue.bind(dead, routing_key="")
    replies_queue = await channel.declare_queue(
        REPLIES_QUEUE, durable=True, arguments=work_queue_arguments()
    )
    await replies_queue.bind(replies, routing_key=REPLIES_ROUTING_KEY)


async def ensure_core(connection: AbstractConnection) -> None:
    """Declare the core topology (:func:`declare_core`) if this user may, else check
    that it is there; either on a channel of its own, closed after.

    A user without the right to declare it (``ACCESS_REFUSED``: a least-privilege
    participant) needs none to check it: a passive declaration only asks whether a
    name exists. Raises :class:`~sagaplane.errors.TopologyMissing`, naming what is
    missing, when it is not there; :class:`UnsupportedBrokerError` for a broker too old.
    """
    try:
        # Not the caller's channel: the broker closes a channel on a refusal, and a
        # robust channel would reopen itself and re-declare what it holds behind our back.
        async with _scratch_channel(connection) as channel:
            await declare_core(channel)
        return
    except ChannelAccessRefused as exc:
        refusal = reply_text(exc)
    log.info("not allowed to declare the core topology (%s); checking that it exists", refusal)
    missing: list[str] = []
    for kind, name in _CORE:
        # A failed passive declaration closes its channel too: one channel per name.
        async with _scratch_channel(connection) as channel:
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                missing.append(f"{kind} {name}")
    if missing:
        raise TopologyMissing(
            f"RabbitMQ lacks {', '.join(missing)}, and this user may not declare them "
            f"({refusal}): start the coordinator first (it declares them), or run "
            "`sagaplane rabbitmq-permissions --apply` as the broker's administrator"
        )


_CORE = (
    ("exchange", COMMANDS_EXCHANGE),
    ("exchange", EVENTS_EXCHANGE),
    ("exchange", REPLIES_EXCHANGE),
    ("exchange", DEAD_LETTER_EXCHANGE),
    ("queue", REPLIES_QUEUE),
    ("queue", DEAD_LETTER_QUEUE),
)
"""What :func:`declare_core` declares, as :func:`ensure_core` checks it."""


@contextlib.asynccontextmanager
async def _scratch_channel(connection: AbstractConnection) -> AsyncIterator[AbstractChannel]:
    # A plain channel even on a robust connection: it is never reopened or restored.
    channel = Channel(connection, publisher_confirms=False)
    await channel.initialize()
    try:
        yield channel
    finally:
        if not channel.is_closed:
            await channel.close()


async def declare_participant_queue(
    channel: AbstractChannel, service: str, actions: Iterable[str]
) -> AbstractQueue:
    """Declare the queue of ``service``, bound to each of its ``actions`` and to no
    other action it was bound to before (idempotent; see the module docstring).

    The core topology must be there (:func:`ensure_core`, :func:`declare_core`).
    ``channel`` must be in publisher-confirm mode (aio-pika's default), as the record of
    the bindings is published on it.
    """
    commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
    queue = await channel.declare_queue(
        participant_queue(service), durable=True, arguments=work_queue_arguments()
    )
    wanted = list(dict.fromkeys(actions))
    for action in wanted:
        await queue.bind(commands, routing_key=action)
    await _unbind_unregistered(channel, commands, queue, service, wanted, bindings_queue(service))
    return queue


async def declare_events_queue(
    channel: AbstractChannel, service: str, patterns: Iterable[str]
) -> AbstractQueue:
    """Declare the events queue of ``service``, bound to :data:`EVENTS_EXCHANGE` with
    each of its topic ``patterns`` and to no other pattern it was bound to before
    (idempotent; recorded as the command queue's actions are, see the module docstring).

    The core topology must be there (:func:`ensure_core`, :func:`declare_core`);
    ``channel`` must be in publisher-confirm mode.
    """
    events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
    queue = await channel.declare_queue(
        events_queue(service), durable=True, arguments=work_queue_arguments()
    )
    wanted = list(dict.fromkeys(patterns))
    for pattern in wanted:
        await queue.bind(events, routing_key=pattern)
    ledger = events_bindings_queue(service)
    await _unbind_unregistered(channel, events, queue, service, wanted, ledger)
    return queue


async def _unbind_unregistered(
    channel: AbstractChannel,
    exchange: AbstractExchange,
    queue: AbstractQueue,
    service: str,
    wanted: list[str],
    ledger_name: str,
) -> None:
    ledger = await channel.declare_queue(
        ledger_name, durable=True, arguments={"x-queue-type": "quorum"}
    )
    # The record's own way in (see the module docstring: not the default exchange).
    recorder = await channel.declare_exchange(ledger_name, ExchangeType.FANOUT, durable=True)
    await ledger.bind(recorder)
    records = []
    while (record := await ledger.get(no_ack=False, fail=False)) is not None:
        records.append(record)
    bound: set[str] = set()
    for record in records:
        bound |= _actions_of(record.body, service)
    for action in sorted(bound - set(wanted)):
        await queue.unbind(exchange, routing_key=action)
        log.info(
            "participant %s: unbound %s from %s (no handler registered for it)",
            service,
            action,
            queue.name,
        )
    await recorder.publish(
        Message(
            json.dumps(wanted).encode(),
            content_type="application/json",
            delivery_mode=DeliveryMode.PERSISTENT,
        ),
        routing_key="",
    )
    for record in records:
        await record.ack()


def _actions_of(body: bytes, service: str) -> set[str]:
    try:
        actions = json.loads(body)
    except ValueError:
        actions = None
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        log.warning("participant %s: ignoring a malformed bindings record %r", service, body[:200])
        return set()
    return set(actions)


async def broker_version(channel: AbstractChannel) -> tuple[int, int] | None:
    """The (major, minor) version the broker of ``channel`` reports; None if it reports
    none that can be read (a proxy, an unusual build)."""
    underlay = await channel.get_underlay_channel()
    return _parse_version(underlay.connection.server_properties.get("version"))


async def _check_broker(channel: AbstractChannel) -> None:
    version = await broker_version(channel)
    # An unknown version (a proxy, an unusual build) gets the benefit of the doubt.
    if version is not None and version < MIN_BROKER_VERSION:
        wanted = ".".join(map(str, MIN_BROKER_VERSION))
        found = ".".join(map(str, version))
        raise UnsupportedBrokerError(
            f"RabbitMQ {wanted} or newer is needed (quorum queues with at-least-once "
            f"dead-lettering); the broker reports {found}"
        )


def _parse_version(raw: object) -> tuple[int, int] | None:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    match = re.match(r"(\d+)\.(\d+)", raw)
    return (int(match.group(1)), int(match.group(2))) if match else None


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` to a binding of ``pattern``: words
    separated by dots, ``*`` standing for exactly one word, ``#`` for zero or more."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])
