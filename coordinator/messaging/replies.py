"""The reply consumer: step replies from RabbitMQ -> saga transitions in PostgreSQL.

Replies are batched by what has already arrived (never by waiting for more): the
worker takes one reply, then whatever else is waiting, applies them all in one
transaction, commits, and only then acks them. A crash before the commit leaves
them unacked, so RabbitMQ delivers them again; the engine recognises a reply
already applied (its step is no longer awaiting that attempt) and ignores it.

While the database is unreachable the batch is held and retried, not requeued:
requeueing would count towards the queue's delivery limit and dead-letter
healthy replies during a database restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from coordinator.errors import SagaNotFound, StorageUnavailable
from coordinator.messaging.codec import UndecodableReply, decode_reply
from coordinator.store.repository import SagaStore

log = logging.getLogger(__name__)

TASK_NAME = "sagaplane-reply-consumer"

_CANCEL_TIMEOUT = 5.0
"""Seconds stop() waits to cancel the consumer (RabbitMQ may be unreachable)."""


class ReplyConsumer:
    """Consumes ``sagaplane.replies`` and applies each batch in one transaction."""

    def __init__(
        self,
        store: SagaStore,
        queue: AbstractQueue,
        *,
        max_batch: int = 256,
        max_backoff: float = 5.0,
    ) -> None:
        self._store = store
        self._queue = queue
        self._max_batch = max_batch
        self._max_backoff = max_backoff
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The worker task, once started."""
        return self._task

    async def start(self) -> None:
        """Start consuming (the queue's channel prefetch bounds what is in flight)."""
        self._consumer_tag = await self._queue.consume(self._inbox.put, no_ack=False)
        self._task = asyncio.create_task(self._run(), name=TASK_NAME)
        self._task.add_done_callback(_crash_loudly)

    async def stop(self) -> None:
        """Stop taking replies and let the batch in progress commit. Safe to call twice.

        Replies received but not applied stay unacked; the broker redelivers them.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._consumer_tag is not None:
            # Bounded: while RabbitMQ is unreachable the robust channel would wait for it
            # to come back, and shutdown would hang until then.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CANCEL_TIMEOUT):
                    await self._queue.cancel(self._consumer_tag)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while len(batch) < self._max_batch and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            # Shielded: once a batch is being applied, stop() lets it commit and ack.
            await asyncio.shield(self._handle(batch))

    async def _handle(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded = []
        for message in batch:
            try:
                decoded.append((message, decode_reply(message.body)))
            except UndecodableReply as exc:
                log.error("dead-lettering reply %s: %s", message.message_id, exc)
                await _settle(message.reject(requeue=False), message)
        if not decoded:
            return
        events = [event for _, event in decoded]
        failures = 0
        while True:
            try:
                results = await self._store.apply_many(events)
                break
            except StorageUnavailable as exc:
                failures += 1
                delay = min(self._max_backoff, 0.1 * 2**failures)
                log.warning("database unavailable (%s); retrying %d replies", exc, len(events))
                await asyncio.sleep(delay)
            except Exception:
                if len(decoded) > 1:
                    # One poison reply must not cost the healthy ones a delivery each
                    # (the queue's delivery limit): find it by applying them one by one.
                    log.exception("applying %d replies failed; retrying singly", len(events))
                    for message, _ in decoded:
                        await self._handle([message])
                    return
                log.exception("reply %s failed; requeueing it", decoded[0][0].message_id)
                await _settle(decoded[0][0].nack(requeue=True), decoded[0][0])
                return
        for (message, _), result in zip(decoded, results, strict=True):
            if isinstance(result.error, SagaNotFound):
                # Can never apply: no such saga here. The dead-letter queue keeps it for a person.
                log.error("dead-lettering reply %s: %s", message.message_id, result.error)
                await _settle(message.reject(requeue=False), message)
                continue
            if result.error is not None:
                log.warning("reply %s not applied: %s", message.message_id, result.error)
            elif result.transition is not None and result.transition.ignored:
                log.info("reply %s ignored: %s", message.message_id, result.transition.ignored)
            await _settle(message.ack(), message)


async def _settle(action: Awaitable[None], message: AbstractIncomingMessage) -> None:
    """Ack, nack or reject; a channel that closed under us (RabbitMQ restarting) is no crash.

    The broker then redelivers the message, and the engine ignores a reply it applied.
    """
    try:
        await action
    except Exception as exc:
        log.warning("could not settle reply %s: %s", message.message_id, exc)


def _crash_loudly(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("reply consumer died", exc_info=task.exception())
