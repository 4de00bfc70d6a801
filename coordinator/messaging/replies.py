"""The reply consumer: step replies from RabbitMQ -> saga transitions in PostgreSQL.

Replies are batched by what has already arrived (never by waiting for more): the
worker takes one reply, then whatever else is waiting, applies them all in one
transaction, commits, and only then acks them. A crash before the commit leaves
them unacked, so RabbitMQ delivers them again; the engine recognises a reply
already applied (its step is no longer awaiting that attempt) and ignores it.

While the database is unreachable the batch is held and retried, not requeued:
requeueing would count towards the queue's delivery limit and dead-letter
healthy replies during a database restart.

A reply that can never apply is dead-lettered alone, with its reason
(:class:`~sagaplane.consuming.DeadLetters`): one that cannot be decoded (garbage,
non-finite numbers, NUL characters, ids that are no ULIDs), one for an unknown saga,
and one the engine refuses as forged (an unknown step, a wrong token). A batch whose
transaction fails is split and applied reply by reply, so a poison reply costs the
others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from coordinator.engine import Event, StepReplied, Transition
from coordinator.errors import StorageUnavailable, UnknownSaga
from coordinator.messaging.codec import UndecodableReply, decode_reply
from coordinator.store.repository import SagaStore
from sagaplane import backoff, logs, wire
from sagaplane.consuming import DeadLetters, settle
from sagaplane.runtime import log_crash

log = logging.getLogger(__name__)

TASK_NAME = "sagaplane-reply-consumer"

_REPLY_TYPE = wire.REPLY_TYPE

_Decoded = tuple[AbstractIncomingMessage, tuple[str, Event]]

_CANCEL_TIMEOUT = 5.0
"""Seconds stop() waits to cancel the consumer (RabbitMQ may be unreachable)."""


class ReplyConsumer:
    """Consumes ``sagaplane.replies`` and applies each batch in one transaction."""

    def __init__(
        self,
        store: SagaStore,
        queue: AbstractQueue,
        dead_letters: DeadLetters,
        *,
        max_batch: int = 256,
        max_backoff: float = 5.0,
    ) -> None:
        self._store = store
        self._queue = queue
        self._dead = dead_letters
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
        self._task.add_done_callback(log_crash(log, "reply consumer"))

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
            try:
                await asyncio.shield(self._handle(batch))
            except asyncio.CancelledError:
                raise
            except Exception:
                # _handle settles every message itself; this is a bug. The consumer
                # stays up, and the broker redelivers whatever was not settled.
                log.exception("handling %d replies failed unexpectedly", len(batch))
                for message in batch:
                    if not message.processed:
                        await settle(message.nack(requeue=True), message)

    async def _handle(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded: list[_Decoded] = []
        for message in batch:
            try:
                if message.type and message.type != _REPLY_TYPE:
                    raise UndecodableReply(f"type is {message.type!r}, not {_REPLY_TYPE!r}")
                decoded.append((message, decode_reply(message.body)))
            except UndecodableReply as exc:
                await self._dead.send(message, str(exc), cause="undecodable")
            except Exception as exc:  # a decoder bug must not take the healthy replies along
                log.exception("decoding reply %s failed", message.message_id)
                await self._dead.send(
                    message, f"cannot be decoded: {type(exc).__name__}", cause="undecodable"
                )
        if decoded:
            await self._apply(decoded)

    async def _apply(self, decoded: list[_Decoded]) -> None:
        events = [event for _, event in decoded]
        failures = 0
        while True:
            try:
                results = await self._store.apply_many(events)
                break
            except StorageUnavailable as exc:
                failures += 1
                delay = backoff.delay(failures, maximum=self._max_backoff)
                log.warning("database unavailable (%s); retrying %d replies", exc, len(events))
                await asyncio.sleep(delay)
            except Exception as exc:
                if len(decoded) > 1:
                    # One poison reply must not cost the healthy ones a delivery each
                    # (the queue's delivery limit): find it by applying them one by one.
                    log.exception("applying %d replies failed; retrying singly", len(events))
                    for one in decoded:
                        await self._apply([one])
                    return
                message = decoded[0][0]
                log.exception("reply %s failed; requeueing it", message.message_id)
                await self._dead.requeue(message, f"{type(exc).__name__}: {exc}")
                return
        for (message, (saga_id, event)), result in zip(decoded, results, strict=True):
            if isinstance(result.error, UnknownSaga):
                # Can never apply: no such saga here. The dead-letter queue keeps it for a person.
                await self._dead.send(message, str(result.error), cause="unknown_saga")
                continue
            if result.transition is not None and result.transition.refused:
                await self._dead.send(
                    message, f"refused: {result.transition.ignored}", cause="refused"
                )
                continue
            if result.error is not None:
                log.warning(
                    "reply %s not applied: %s",
                    message.message_id,
                    result.error,
                    extra=_fields(saga_id, event, result.transition),
                )
            elif result.transition is not None and result.transition.ignored:
                log.info(
                    "reply %s ignored: %s",
                    message.message_id,
                    result.transition.ignored,
                    extra=_fields(saga_id, event, result.transition),
                )
            await settle(message.ack(), message)


def _fields(saga_id: str, event: Event, transition: Transition | None) -> dict[str, object]:
    """The log fields of a reply: its saga, its step's name (when known) and attempt."""
    if not isinstance(event, StepReplied):
        return logs.fields(saga_id)
    step = transition.saga.step_by_id(event.step_id) if transition is not None else None
    return logs.fields(saga_id, step.name if step is not None else None, event.attempt)
