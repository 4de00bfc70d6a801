"""Writing messages to the transactional outbox (``sagaplane_outbox``).

The rows are published later by :mod:`sagaplane.relay`; writing them in the
same transaction as the state change is what makes "state changed" and
"message will be sent" one atomic fact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


# -- what operators see (``sagaplane outbox``) ---------------------------------------------

STATUSES = ("pending", "failed", "published", "invalid", "expired")
"""Every outbox row's status (``sql/outbox/0005_status.sql`` and ``0006_failed_at.sql``
say what each means)."""
PROBLEM_STATUSES = ("failed", "invalid", "expired")
"""The statuses a person may have to act on."""


@dataclass(frozen=True, kw_only=True)
class OutboxStats:
    """How many rows of each status an outbox holds."""

    counts: dict[str, int]
    """Rows per status (every status of :data:`STATUSES`, 0 included)."""
    oldest_pending_s: float | None
    """Seconds the oldest row not published (pending or failed) has waited; None if none."""
    last_failed_at: datetime | None = None
    """When the latest failure among the ``failed`` rows happened; None if none failed."""
    last_error: str | None = None
    """Why it failed (the broker refused the row, or could not be reached)."""


@dataclass(frozen=True, kw_only=True)
class OutboxRow:
    """One outbox row, as ``sagaplane outbox list`` shows it."""

    id: int
    status: str
    message_id: str
    exchange: str
    routing_key: str
    message_type: str
    attempts: int
    """Failed publishes charged to the row (its own fault; an outage charges none)."""
    created_at: datetime
    next_attempt_at: datetime | None
    last_error: str | None
    failed_at: datetime | None = None
    """When a publish of it last failed, for any reason."""


async def stats(conn: AsyncConnection[Any]) -> OutboxStats:
    """Count the rows of the outbox on ``conn`` per status; the latest failure among the
    failed ones."""
    cur = await conn.execute(q("outbox_stats"))
    counts = dict.fromkeys(STATUSES, 0)
    oldest: float | None = None
    for status, count, waited in await cur.fetchall():
        counts[str(status)] = int(count)
        if waited is not None:
            oldest = float(waited) if oldest is None else max(oldest, float(waited))
    failed_at, error = None, None
    if counts["failed"]:
        cur = await conn.execute(q("outbox_last_failure"))
        if (last := await cur.fetchone()) is not None:
            failed_at, error = last[0], last[1]
    return OutboxStats(
        counts=counts, oldest_pending_s=oldest, last_failed_at=failed_at, last_error=error
    )


async def problems(
    conn: AsyncConnection[Any],
    statuses: Sequence[str] = PROBLEM_STATUSES,
    *,
    limit: int = 50,
    after: int = 0,
) -> list[OutboxRow]:
    """The rows in ``statuses`` with an id above ``after``, oldest first, at most ``limit``."""
    cur = await conn.execute(
        q("outbox_problems"), {"statuses": list(statuses), "limit": limit, "after": after}
    )
    return [
        OutboxRow(
            id=r[0],
            status=r[1],
            message_id=r[2],
            exchange=r[3],
            routing_key=r[4],
            message_type=r[5],
            attempts=r[6],
            created_at=r[7],
            next_attempt_at=r[8],
            last_error=r[9],
            failed_at=r[10],
        )
        for r in await cur.fetchall()
    ]


async def retry(conn: AsyncConnection[Any], ids: Sequence[int]) -> list[int]:
    """Put the unpublished rows of ``ids`` back to pending (attempts, error and age
    reset); the ids changed. The caller commits; the relay publishes them after."""
    cur = await conn.execute(q("outbox_retry"), {"ids": list(ids)})
    return sorted(int(r[0]) for r in await cur.fetchall())


async def discard(conn: AsyncConnection[Any], ids: Sequence[int]) -> list[int]:
    """Delete the unpublished rows of ``ids`` (never to be published); the ids deleted.
    The caller commits."""
    cur = await conn.execute(q("outbox_discard"), {"ids": list(ids)})
    return sorted(int(r[0]) for r in await cur.fetchall())
