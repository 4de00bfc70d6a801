"""What every consumer does with a message it took: settle it, or dead-letter it with a reason.

A message that can never be processed goes to :data:`~sagaplane.topology.DEAD_LETTER_QUEUE`
with a header that says why.

The broker's own dead-lettering (reject without requeue) records only *that* a message
died (``x-death``). A person looking at the dead-letter queue needs *why*, so the
consumer publishes a copy to the dead-letter exchange, with the reason in the
``sagaplane-reason`` header and the queue it came from in ``sagaplane-queue``, waits for
the broker's confirm, and only then acks the original. If that publish fails, the
original is rejected instead and the broker dead-letters it without the reason: a bad
message is never requeued forever and never lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from sagaplane.limits import clean_text
from sagaplane.topology import DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT

__all__ = [
    "DELIVERY_COUNT_HEADER",
    "QUEUE_HEADER",
    "REASON_HEADER",
    "ROUTING_KEY_HEADER",
    "DeadLetters",
    "deliveries",
    "settle",
]

log = logging.getLogger(__name__)

REASON_HEADER = "sagaplane-reason"
"""Why the message was dead-lettered."""
QUEUE_HEADER = "sagaplane-queue"
"""The queue it was consumed from."""
ROUTING_KEY_HEADER = "sagaplane-routing-key"
"""The routing key it was published with."""
DELIVERY_COUNT_HEADER = "x-delivery-count"
"""Set by quorum queues on a redelivered message: how many deliveries came before."""

_MAX_REASON_CHARS = 1000


class DeadLetters:
    """Dead-letters messages consumed from ``queue`` over ``connection``, and counts them."""

    def __init__(
        self, connection: AbstractConnection, *, queue: str, confirm_timeout: float = 10.0
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._confirm_timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    @property
    def counts(self) -> Mapping[str, int]:
        """How many messages were dead-lettered, by cause (e.g. ``"undecodable"``)."""
        return self._counts

    async def send(self, message: AbstractIncomingMessage, reason: str, *, cause: str) -> None:
        """Dead-letter ``message`` with ``reason``, then settle it; never raises.

        ``cause`` is a short word that groups the count (``"undecodable"``, ...).
        """
        reason = clean_text(reason, _MAX_REASON_CHARS)
        self._counts[cause] += 1
        log.error(
            "dead-lettering message %s from %s (%s): %s",
            message.message_id,
            self._queue,
            cause,
            reason,
        )
        try:
            await self._publish(message, reason)
        except Exception as exc:
            log.warning(
                "could not publish message %s to %s (%s); rejecting it instead",
                message.message_id,
                DEAD_LETTER_EXCHANGE,
                exc,
            )
            await self._discard_channel()
            await settle(message.reject(requeue=False), message)
            return
        await settle(message.ack(), message)

    async def requeue(self, message: AbstractIncomingMessage, failure: str) -> None:
        """Requeue ``message`` after a failure that may pass (a bug, a bad row); on its
        last delivery (:data:`~sagaplane.topology.DELIVERY_LIMIT`) dead-letter it with
        ``failure`` instead, where the broker would drop it without saying why."""
        if deliveries(message) + 1 >= DELIVERY_LIMIT:
            reason = f"failed on all {DELIVERY_LIMIT} deliveries: {failure}"
            await self.send(message, reason, cause="failed")
        else:
            await settle(message.nack(requeue=True), message)

    async def close(self) -> None:
        """Close the channel; safe to call twice."""
        await self._discard_channel()

    async def _publish(self, message: AbstractIncomingMessage, reason: str) -> None:
        async with self._lock, asyncio.timeout(self._confirm_timeout):
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=True)
            exchange = await self._channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
            headers: dict[str, Any] = dict(message.headers or {})
            headers.update(
                {
                    REASON_HEADER: reason,
                    QUEUE_HEADER: self._queue,
                    ROUTING_KEY_HEADER: message.routing_key or "",
                }
            )
            copy = aio_pika.Message(
                message.body,
                headers=headers,
                message_id=message.message_id,
                type=message.type,
                content_type=message.content_type,
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(copy, routing_key="")

    async def _discard_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await channel.close()


def deliveries(message: AbstractIncomingMessage) -> int:
    """How many times ``message`` was delivered before, as its quorum queue counts."""
    value = (message.headers or {}).get(DELIVERY_COUNT_HEADER, 0)
    return value if isinstance(value, int) else 0


async def settle(action: Awaitable[None], message: AbstractIncomingMessage) -> None:
    """Await an ack, nack or reject of ``message``; a channel that closed under us
    (RabbitMQ restarting) is logged, not raised: the broker then redelivers the message,
    and every consumer of Sagaplane handles a redelivery."""
    try:
        await action
    except Exception as exc:
        log.warning("could not settle message %s: %s", message.message_id, exc)
