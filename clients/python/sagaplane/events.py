"""Domain events: CloudEvents written to the outbox in the caller's transaction.

:func:`emit` writes one event to the local outbox (``sagaplane_outbox``) on the caller's
connection, inside the caller's transaction: the event is published only after that
transaction commits, and never if it rolls back. The relay (:mod:`sagaplane.relay`)
publishes it to the topic exchange :data:`~sagaplane.topology.EVENTS_EXCHANGE` with the
event's type as routing key; an event no queue is bound for is dropped by the broker
(publish/subscribe), which is not a failure. The envelope is CloudEvents 1.0 in JSON,
structured content mode (see :mod:`sagaplane.wire`).

In a step or compensation handler, use ``ctx.emit(...)``
(:meth:`~sagaplane.handler.StepContext.emit`): the event commits with the step's
outcome, or rolls back with a failing handler's writes.

Events are consumed with ``@participant.on_event("order.*")``: each handler runs with an
:class:`EventContext`, in one transaction of the consuming service's database with an
inbox row keyed by the event's (source, id), so a redelivered or re-published event runs
its handlers once (see :mod:`sagaplane.event_consumer`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from ulid import ULID

from sagaplane import topology, wire
from sagaplane.outbox import OutboundMessage, enqueue
from sagaplane.wire import Event

__all__ = ["Event", "EventContext", "EventHandler", "emit", "new_event", "outbound"]


async def emit(
    conn: AsyncConnection[Any],
    type: str,
    data: Mapping[str, Any] | None = None,
    *,
    source: str,
    subject: str | None = None,
    id: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> Event:
    """Write the event to the outbox inside the caller's transaction; returns it.

    The caller commits (nothing is published before, and nothing ever if it rolls
    back); ``conn`` is the service's own database, which has the outbox migrations
    (:func:`sagaplane.migrations.outbox_migrations`). ``data`` is a JSON object;
    ``source`` names the emitter (a participant's ``ctx.emit`` uses its service
    name); ``id`` defaults to a new ULID, and (``source``, ``id``) must be unique, as
    consumers deduplicate on it; ``time`` is now. Raises
    :class:`~sagaplane.errors.InvalidEvent` for an event that cannot be sent (an empty
    type, data that is not JSON, an extension name CloudEvents refuses, too large).
    """
    event = new_event(type, data, source=source, subject=subject, id=id, extensions=extensions)
    await enqueue(conn, [outbound(event)])
    return event


def new_event(
    type: str,
    data: Mapping[str, Any] | None = None,
    *,
    source: str,
    subject: str | None = None,
    id: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> Event:
    """The event :func:`emit` would write (id a new ULID unless given, time now)."""
    return Event(
        type=type,
        source=source,
        id=id if id is not None else str(ULID()),
        time=datetime.now(UTC),
        subject=subject,
        data=data,
        extensions=dict(extensions or {}),
    )


def outbound(event: Event) -> OutboundMessage:
    """The outbox message that publishes ``event``; raises
    :class:`~sagaplane.errors.InvalidEvent` as :func:`emit` does."""
    return OutboundMessage(
        message_id=event.id,
        exchange=topology.EVENTS_EXCHANGE,
        routing_key=event.type,
        # The AMQP type property: what happened, for people reading a queue.
        message_type=event.type,
        body=wire.encode_event(event),
        correlation_id=event.subject,
    )


@dataclass(frozen=True, kw_only=True)
class EventContext:
    """What an event handler is given: the event, and the transaction to write in."""

    event: Event
    """The parsed CloudEvent (``type``, ``source``, ``id``, ``time``, ``subject``, ``data``)."""
    tx: AsyncConnection[Any]
    """The connection, inside the event's transaction (with its inbox row). Write with it
    and do not commit or roll back: the SDK commits; a handler that raises rolls back
    everything it wrote, and the event is retried."""
    service: str
    """The consuming service (the ``source`` of what :meth:`emit` writes)."""
    attempt: int
    """1 for the first run of the handler on this delivery, counting up on every retry."""

    async def emit(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
        id: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> Event:
        """Emit a further event in this transaction (see :func:`emit`); source: this
        service."""
        return await emit(
            self.tx,
            type,
            data,
            source=self.service,
            subject=subject,
            id=id,
            extensions=extensions,
        )


EventHandler = Callable[[EventContext], Awaitable[None]]
"""``async def handler(ctx: EventContext) -> None``. Raising rolls the handler's writes
back; the event is retried with backoff, then dead-lettered with the error."""
