"""The participant's consumer: each delivered command decoded, processed, then settled.

A message that is not a valid StepCommand (garbage, ids or names past the wire's limits,
JSON that PostgreSQL cannot hold; see :func:`sagaplane.wire.decode_command`), or names
an action this service did not register, is dead-lettered to ``sagaplane.dead-letter``
with its reason (:class:`~sagaplane.consuming.DeadLetters`), alone.

A valid command is processed by the :class:`~sagaplane.inbox.Inbox` in one transaction
and acked only after its COMMIT: a crash before the ack redelivers the command, and the
inbox answers it without running the handler again. While PostgreSQL is unreachable
the command is held (unacked) and retried in process with a capped backoff, so that an
outage does not burn the queue's delivery limit and dead-letter it. Any other failure
(a bug, a bad row) requeues the command; on its last delivery it is dead-lettered with
the reason instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import PoolTimeout

from sagaplane import backoff, wire
from sagaplane.consuming import DeadLetters, settle
from sagaplane.handler import Handler
from sagaplane.inbox import Inbox
from sagaplane.wire import StepKind

__all__ = ["CommandConsumer"]

# The participant's log, as one name for everything a participant does.
log = logging.getLogger("sagaplane.participant")

# Backoff while PostgreSQL is unreachable (see the module docstring).
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0

_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    PoolTimeout,
)


class CommandConsumer:
    """Handles the messages of ``service``'s queue, each in a task of its own.

    ``stopping`` is set when the participant stops: messages delivered after it are
    returned to the queue, and a command held through a database outage is requeued.
    """

    def __init__(
        self,
        *,
        service: str,
        handlers: Mapping[tuple[StepKind, str], Handler],
        inbox: Inbox,
        dead_letters: DeadLetters,
        stopping: asyncio.Event,
        task_prefix: str,
    ) -> None:
        self._service = service
        self._handlers = handlers
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._stopping = stopping
        self._task_prefix = task_prefix
        self._inflight: set[asyncio.Task[None]] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """The queue's consumer callback."""
        # Handled in a task of our own, not aio-pika's: a lost channel cancels the
        # library's tasks, and a handler cut off mid-transaction helps nobody (its reply
        # is safe in the outbox; the redelivered copy is answered from the inbox).
        if self._stopping.is_set():
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        task = asyncio.create_task(
            self._handle(message), name=f"{self._task_prefix}-command-{message.message_id}"
        )
        self._inflight.add(task)
        task.add_done_callback(self._command_done)

    async def drain(self, grace: float) -> None:
        """Wait for the commands in flight; after ``grace`` seconds cancel the rest
        (unacked, they are redelivered, and the inbox answers any that did commit)."""
        if not self._inflight:
            return
        _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        if pending:
            log.warning(
                "participant %s: cancelling %d commands still running after %.1fs; "
                "they will be redelivered",
                self._service,
                len(pending),
                grace,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _handle catches everything it expects; anything else is a bug worth shouting.
            log.critical(
                "participant %s: %s crashed",
                self._service,
                task.get_name(),
                exc_info=task.exception(),
            )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            command = wire.decode_command(message.body, message.type)
        except wire.Undecodable as exc:
            await self._dead_letters.send(message, str(exc), cause="undecodable")
            return
        except Exception as exc:  # a decoder bug must not loop the message
            log.exception("participant %s: decoding %s failed", self._service, message.message_id)
            await self._dead_letters.send(
                message, f"cannot be decoded: {type(exc).__name__}", cause="undecodable"
            )
            return
        kind = wire.KIND_FROM_PROTO[command.kind]
        handler = self._handlers.get((kind, command.action))
        if handler is None:
            await self._dead_letters.send(
                message,
                f"participant {self._service} has no {kind} handler for action {command.action!r}",
                cause="unknown_action",
            )
            return
        failures = 0
        while True:
            try:
                await self._inbox.process(command, kind, handler, message_id=message.message_id)
                break
            except _TRANSIENT as exc:
                failures += 1
                if self._stopping.is_set():
                    await settle(message.nack(requeue=True), message)
                    return
                delay = backoff.delay(failures, initial=_MIN_BACKOFF, maximum=_MAX_BACKOFF)
                log.warning(
                    "participant %s: message %s: database unavailable (%s: %s); retrying in %.1fs",
                    self._service,
                    message.message_id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
            except Exception as exc:
                # Not the handler's failure (that is caught and replied): a bug or a bad
                # row. Requeued; on its last delivery it is dead-lettered with the reason.
                log.exception(
                    "participant %s: message %s could not be processed; requeueing",
                    self._service,
                    message.message_id,
                )
                await self._dead_letters.requeue(message, f"{type(exc).__name__}: {exc}")
                return
        # Only now, after COMMIT: a crash before this line redelivers the command, and
        # the inbox answers it without running the handler again.
        await settle(message.ack(), message)
