"""Writing messages to the transactional outbox (``sagaplane_outbox``).

The rows are published later by :mod:`sagaplane.relay`; writing them in the
same transaction as the state change is what makes "state changed" and
"message will be sent" one atomic fact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from sagaplane import batch
from sagaplane.queries import q


@dataclass(frozen=True, kw_only=True)
class OutboundMessage:
    """A message to publish to RabbitMQ once its transaction has committed."""

    message_id: str
    """The AMQP ``message_id``; receivers deduplicate on it."""
    exchange: str
    """Exchange to publish to."""
    routing_key: str
    """Routing key (for commands: the action)."""
    message_type: str
    """Full protobuf message name, sent as the AMQP ``type`` property."""
    body: bytes
    """The serialized protobuf envelope."""
    correlation_id: str | None = None
    """Groups messages for people (the coordinator uses the saga id)."""
    headers: Mapping[str, str] | None = None
    """AMQP headers to publish with it: the trace context (see sagaplane.tracing)."""


INSERT_ONE = q("insert_outbox_message")
"""One outbox row; its parameters are :func:`insert_params` (prefixed, so that they can
share a batch of statements with other named parameters)."""


def insert_params(message: OutboundMessage) -> dict[str, object]:
    """The parameters of :data:`INSERT_ONE` for ``message``."""
    return {
        "outbox_message_id": message.message_id,
        "outbox_exchange": message.exchange,
        "outbox_routing_key": message.routing_key,
        "outbox_message_type": message.message_type,
        "outbox_body": message.body,
        "outbox_correlation_id": message.correlation_id,
        "outbox_headers": Jsonb(dict(message.headers)) if message.headers else None,
    }


INSERT_MANY = q("insert_outbox_messages")
"""Many outbox rows in one statement, in order; its parameters are
:func:`insert_many_params`."""


def insert_many_params(messages: Sequence[OutboundMessage]) -> dict[str, object]:
    """The parameters of :data:`INSERT_MANY` for ``messages``."""
    return {
        "outbox_rows": batch.records(
            {
                "message_id": m.message_id,
                "exchange": m.exchange,
                "routing_key": m.routing_key,
                "message_type": m.message_type,
                "body": m.body,
                "correlation_id": m.correlation_id,
                "headers": Jsonb(dict(m.headers)) if m.headers else None,
            }
            for m in messages
        )
    }


async def enqueue(conn: AsyncConnection[object], messages: Sequence[OutboundMessage]) -> None:
    """Add ``messages`` to the outbox inside the caller's transaction.

    The caller commits; nothing is published before that commit.
    """
    if not messages:
        return
    async with conn.cursor() as cur:
        await cur.executemany(INSERT_ONE, [insert_params(m) for m in messages])
