"""The consumer of a service's events queue: each event handled once, in one transaction.

Every delivered event is handled in a task of its own::

    decode (a CloudEvents 1.0 event?)         -- else dead-lettered with the reason
    BEGIN
      claim the inbox row of (service, source, id)  -- blocks a concurrent copy
      claimed?  run every handler whose pattern matches the type, on ctx.tx
      seen?     nothing to do (a redelivery, a re-publish)
    COMMIT
    ack

So the handlers' writes and "this event was handled here" commit together or not at
all, and the event is acked only after the COMMIT: a crash before the ack redelivers it,
and the inbox skips it. A handler that raises rolls everything back (the claim too); the
event is held (unacked) and retried in process with exponential backoff, up to
``max_attempts`` runs, then dead-lettered with the error. Other events keep flowing
meanwhile: each is its own task, up to the queue's prefetch. While PostgreSQL is
unreachable an event is held and retried without counting attempts, as commands are.
An event whose type no handler matches (a binding removed while it was queued) is
acked and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sagaplane import backoff, batch, wire
from sagaplane.consuming import DeadLetters, settle
from sagaplane.events import EventContext, EventHandler
from sagaplane.queries import q
from sagaplane.topology import topic_matches

__all__ = ["EventConsumer"]

log = logging.getLogger("sagaplane.participant")

_CLAIM = q("event_inbox_claim")

# Backoff while PostgreSQL is unreachable (as for commands).
_DB_MIN_BACKOFF = 0.1
_DB_MAX_BACKOFF = 5.0

_TRANSIENT: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)


class _HandlerEndedTransaction(RuntimeError):
    """A handler committed or rolled back the SDK's transaction."""


class _HandlerFailed(Exception):
    """A handler raised (``.error``); kept apart from the SDK's own database errors, so
    that a handler's failing statement is not taken for an outage."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class EventConsumer:
    """Handles the messages of ``service``'s events queue (see the module docstring).

    ``handlers`` are (topic pattern, handler) in registration order; every handler whose
    pattern matches an event's type runs for it, in that order, in one transaction.
    A failing run is retried after ``retry_initial`` seconds, doubling up to
    ``retry_max``, until ``max_attempts`` runs have failed.
    """

    def __init__(
        self,
        *,
        service: str,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        handlers: Sequence[tuple[str, EventHandler]],
        dead_letters: DeadLetters,
        stopping: asyncio.Event,
        task_prefix: str,
        max_attempts: int,
        retry_initial: float,
        retry_max: float,
    ) -> None:
        self._service = service
        self._pool = pool
        self._handlers = tuple(handlers)
        self._dead_letters = dead_letters
        self._stopping = stopping
        self._task_prefix = task_prefix
        self._max_attempts = max_attempts
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._inflight: set[asyncio.Task[None]] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The events queue's consumer callback."""
        if self._stopping.is_set():
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        task = asyncio.create_task(
            self._handle(message), name=f"{self._task_prefix}-event-{message.message_id}"
        )
        self._inflight.add(task)
        task.add_done_callback(self._done)

    async def drain(self, grace: float) -> None:
        """Wait for the events in flight; after ``grace`` seconds cancel the rest (unacked,
        they are redelivered, and the inbox skips any that did commit)."""
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.critical(
                "participant %s: %s crashed",
                self._service,
                task.get_name(),
                exc_info=task.exception(),
            )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = wire.decode_event(message.body, message.content_type, message.headers)
        except wire.Undecodable as exc:
            await self._dead_letters.send(message, str(exc), cause="undecodable")
            return
        except Exception as exc:  # a decoder bug must not loop the message
            log.exception("participant %s: decoding event %s failed", self._service, exc)
            reason = f"cannot be decoded: {type(exc).__name__}"
            await self._dead_letters.send(message, reason, cause="undecodable")
            return
        handlers = [h for pattern, h in self._handlers if topic_matches(pattern, event.type)]
        if not handlers:
            log.warning(
                "participant %s: no handler for event type %r (event %s from %s); dropped",
                self._service,
                event.type,
                event.id,
                event.source,
            )
            await settle(message.ack(), message)
            return
        attempt = 1
        db_failures = 0
        while True:
            try:
                ran = await self._process(event, handlers, attempt)
            except _TRANSIENT as exc:
                db_failures += 1
                if self._stopping.is_set():
                    await settle(message.nack(requeue=True), message)
                    return
                delay = backoff.delay(db_failures, initial=_DB_MIN_BACKOFF, maximum=_DB_MAX_BACKOFF)
                log.warning(
                    "participant %s: event %s: database unavailable (%s: %s); retrying in %.1fs",
                    self._service,
                    event.id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._sleep(delay)
                continue
            except Exception as exc:
                error = exc.error if isinstance(exc, _HandlerFailed) else exc
                failure = f"{type(error).__name__}: {error}"
                if attempt >= self._max_attempts:
                    reason = f"event handler failed {attempt} times: {failure}"
                    await self._dead_letters.send(message, reason, cause="failed")
                    return
                if self._stopping.is_set():
                    await settle(message.nack(requeue=True), message)
                    return
                delay = backoff.delay(attempt, initial=self._retry_initial, maximum=self._retry_max)
                log.warning(
                    "participant %s: event %s (%s from %s) failed (attempt %d of %d): %s; "
                    "retrying in %.1fs",
                    self._service,
                    event.id,
                    event.type,
                    event.source,
                    attempt,
                    self._max_attempts,
                    failure,
                    delay,
                    exc_info=error,
                )
                attempt += 1
                await self._sleep(delay)
                continue
            if not ran:
                log.info(
                    "participant %s: event %s from %s was handled already; skipped",
                    self._service,
                    event.id,
                    event.source,
                )
            # Only now, after COMMIT: a crash before this line redelivers the event, and
            # the inbox skips it.
            await settle(message.ack(), message)
            return

    async def _process(self, event: wire.Event, handlers: list[EventHandler], attempt: int) -> bool:
        """One transaction: claim, run the handlers, commit; False if it was handled."""
        claim = {
            "consumer": self._service,
            "source": event.source,
            "id": event.id,
            "type": event.type,
        }
        async with self._pool.connection() as conn:
            cur = AsyncClientCursor(conn)
            try:
                [claimed] = await batch.run(cur, [("BEGIN", None), (_CLAIM, claim)])
                if not claimed:
                    await cur.execute("COMMIT")
                    return False
                ctx = EventContext(event=event, tx=conn, service=self._service, attempt=attempt)
                for handler in handlers:
                    try:
                        await handler(ctx)
                    except Exception as exc:
                        if conn.broken:
                            raise  # the connection, not the handler: retried as an outage
                        raise _HandlerFailed(exc) from exc
                    if conn.info.transaction_status is not TransactionStatus.INTRANS:
                        raise _HandlerEndedTransaction(
                            f"the handler {getattr(handler, '__qualname__', handler)!r} of "
                            f"{event.type!r} ended the SDK's transaction (or a statement of "
                            "it failed); write on ctx.tx and let the SDK commit"
                        )
                await cur.execute("COMMIT")
            except BaseException:
                await batch.rollback_after_error(conn)
                raise
        return True

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()
