"""The participant's consumer: each delivered command decoded, processed, then settled.

Every message is handled in a task of its own: decoded into a
:class:`~sagaplane.middleware.Delivery`, passed through the participant's middleware
around the processing, and settled after the outermost middleware returned.

A message that is not a valid StepCommand (garbage, ids or names past the wire's limits,
JSON that PostgreSQL cannot hold; see :func:`sagaplane.wire.decode_command`) is
dead-lettered to ``sagaplane.dead-letter`` with its reason
(:class:`~sagaplane.consuming.DeadLetters`), alone. A valid command for an action this
service has no handler for (of its kind) is answered, through the inbox like any other,
with a non-retryable failure that names the action
(:class:`~sagaplane.errors.NoHandler`): the saga learns at once, rather than waiting out
its timeouts for a command that sits in the dead-letter queue.
With signing keys (:mod:`sagaplane.signing`), a command not signed by the
coordinator is dead-lettered (cause ``signature``), before anything in it is read.

A valid command is processed by the :class:`~sagaplane.inbox.Inbox` in one transaction
and acked only after its COMMIT (and the middleware): a crash before the ack redelivers
the command, and the inbox answers it without running the handler again. While
PostgreSQL is unreachable the command is held (unacked) and retried in process with a
capped backoff, so that an outage does not burn the queue's delivery limit and
dead-letter it. Any other failure
(a bug, a bad row, a middleware that raised) requeues the command; on its last delivery
it is dead-lettered with the reason instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from psycopg_pool import PoolTimeout

from sagaplane import backoff, deadlines, logs, signing, tracing, wire
from sagaplane.consuming import DeadLetters, settle
from sagaplane.errors import NoHandler
from sagaplane.handler import Handler, StepContext
from sagaplane.inbox import Inbox
from sagaplane.metrics import ParticipantMetrics
from sagaplane.middleware import CallNext, Delivery, Middleware, Processed
from sagaplane.wire import StepKind

__all__ = ["CommandConsumer"]

# The participant's log, as one name for everything a participant does.
log = logging.getLogger("sagaplane.participant")

# Backoff while PostgreSQL is unreachable (see the module docstring).
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0

_UNSIGNED = "signature: "
"""How the refusal of a command without a valid signature begins (cause ``signature``)."""

_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    PoolTimeout,
)


class CommandConsumer:
    """Handles the messages of ``service``'s queue, each in a task of its own, through
    ``middleware`` (see :mod:`sagaplane.middleware`).

    ``stopping`` is set when the participant stops: messages delivered after it are
    returned to the queue, and a command held through a database outage is requeued.
    ``clock_tolerance`` is how far a command's deadline is believed (see
    :func:`sagaplane.deadlines.for_command`).
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
        middleware: Sequence[Middleware] = (),
        clock_tolerance: float | None = deadlines.DEFAULT_CLOCK_TOLERANCE,
        metrics: ParticipantMetrics | None = None,
        signing_keys: Sequence[bytes] | None = None,
    ) -> None:
        self._metrics = metrics
        self._signing_keys = signing_keys
        self._service = service
        self._clock_tolerance = clock_tolerance
        self._handlers = handlers
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._stopping = stopping
        self._task_prefix = task_prefix
        self._middleware = tuple(middleware)
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
        delivery = self._delivery(message)
        command = delivery.command
        if command is None:
            await self._settle(message, delivery)
            return
        # Every line logged while this command is handled names its saga, step and attempt.
        with logs.about(command.saga_id, command.step_name or None, command.attempt):
            await self._settle(message, delivery)

    async def _settle(self, message: AbstractIncomingMessage, delivery: Delivery) -> None:
        chain = _Chain(self._process, delivery)
        try:
            await chain.run(self._middleware)
        except Exception as exc:
            # Not the handler's failure (that is caught and replied): a bug, a bad row,
            # or a middleware's. Requeued; on its last delivery dead-lettered with why.
            log.exception(
                "participant %s: message %s could not be processed; requeueing",
                self._service,
                message.message_id,
            )
            await self._dead_letters.requeue(message, f"{type(exc).__name__}: {exc}")
            self._count(delivery, "error")
            return
        if chain.processed.committed:
            # Only now, after COMMIT and the middleware: a crash before this line
            # redelivers the command, and the inbox answers it without running the
            # handler again.
            await settle(message.ack(), message)
        elif chain.processed is Processed.DEAD_LETTERED:
            assert delivery.refusal is not None
            cause = "signature" if delivery.refusal.startswith(_UNSIGNED) else "undecodable"
            await self._dead_letters.send(message, delivery.refusal, cause=cause)
            self._count(delivery, "dead_lettered")
        else:
            await settle(message.nack(requeue=True), message)
            self._count(delivery, "requeued")

    def _count(self, delivery: Delivery, outcome: str) -> None:
        """A delivery the inbox did not count (it counts what it committed)."""
        if self._metrics is not None:
            known = delivery.refusal is None  # else the action may be anything a sender wrote
            self._metrics.handled((delivery.action or "") if known else "", delivery.kind, outcome)

    def _delivery(self, message: AbstractIncomingMessage) -> Delivery:
        """The message decoded and checked, or with the reason it cannot be processed."""
        # The attempt's time here counts from now (both clocks read together).
        arrived_at, arrived = datetime.now(UTC), time.monotonic()
        if self._signing_keys is not None:
            # Before anything in it is believed: only the coordinator's commands run.
            try:
                signing.verify_command(
                    self._signing_keys,
                    message.body,
                    message.headers,
                    routing_key=message.routing_key or "",
                    message_id=message.message_id or "",
                )
            except signing.BadSignature as exc:
                return Delivery(
                    message=message, command=None, kind=None, refusal=f"{_UNSIGNED}{exc}"
                )
        try:
            command = wire.decode_command(message.body, message.type)
        except wire.Undecodable as exc:
            return Delivery(message=message, command=None, kind=None, refusal=str(exc))
        except Exception as exc:  # a decoder bug must not loop the message
            log.exception("participant %s: decoding %s failed", self._service, message.message_id)
            return Delivery(
                message=message,
                command=None,
                kind=None,
                refusal=f"cannot be decoded: {type(exc).__name__}",
            )
        kind = wire.KIND_FROM_PROTO[command.kind]
        deadline = deadlines.for_command(
            command, arrived_at=arrived_at, arrived=arrived, clock_tolerance=self._clock_tolerance
        )
        return Delivery(
            message=message, command=command, kind=kind, refusal=None, deadline=deadline
        )

    def _no_handler(self, kind: StepKind, action: str) -> Handler:
        return _NoHandler(
            f"participant {self._service} has no {kind} handler for action {action!r}"
        )

    async def _process(self, delivery: Delivery) -> Processed:
        """The innermost call_next: the command's transaction, retried while PostgreSQL
        is unavailable (held, unacked, until the participant stops)."""
        command, kind, message = delivery.command, delivery.kind, delivery.message
        if delivery.refusal is not None:
            return Processed.DEAD_LETTERED
        assert command is not None and kind is not None
        handler = self._handlers.get((kind, command.action))
        # An action without a handler is any name a sender chose: not a metrics label.
        label = None if handler is not None else ""
        if handler is None:
            handler = self._no_handler(kind, command.action)
        # The handler's span, with its transaction, under the attempt's span that the
        # coordinator put in the command's headers (and over the reply it writes).
        with tracing.span(
            f"{kind} {command.action}",
            parent=tracing.from_metadata((message.headers or {}).items()),
            kind="consumer",
            attributes={
                "sagaplane.saga_id": command.saga_id,
                "sagaplane.saga": command.saga_name,
                "sagaplane.step": command.step_name,
                "sagaplane.attempt": command.attempt,
                "sagaplane.action": command.action,
                "sagaplane.service": self._service,
            },
        ):
            return await self._process_until_stored(delivery, handler, label)

    async def _process_until_stored(
        self, delivery: Delivery, handler: Handler, label: str | None
    ) -> Processed:
        command, kind, message = delivery.command, delivery.kind, delivery.message
        assert command is not None and kind is not None
        failures = 0
        while True:
            try:
                return await self._inbox.process(
                    command,
                    kind,
                    handler,
                    message_id=message.message_id,
                    deadline=delivery.deadline,
                    label=label,
                )
            except _TRANSIENT as exc:
                failures += 1
                if self._stopping.is_set():
                    return Processed.REQUEUED
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


class _NoHandler:
    """The handler of an action the participant does not handle: a non-retryable failure."""

    def __init__(self, message: str) -> None:
        self._message = message

    async def __call__(self, ctx: StepContext) -> None:
        raise NoHandler(self._message)


class _Chain:
    """The middleware around one delivery's processing, and what the processing did."""

    def __init__(
        self, process: Callable[[Delivery], Awaitable[Processed]], delivery: Delivery
    ) -> None:
        self._process = process
        self._delivery = delivery
        self._called = False
        self._result: Processed | None = None
        self._error: Exception | None = None

    @property
    def processed(self) -> Processed:
        """What the processing did; only after :meth:`run` returned."""
        assert self._result is not None
        return self._result

    async def run(self, middleware: Sequence[Middleware]) -> None:
        """Run ``middleware`` (outermost first) around the processing; raises what the
        processing or a middleware raised, or if the processing did not succeed."""
        call_next: CallNext = self._innermost
        for layer in reversed(middleware):
            call_next = self._around(layer, call_next)
        await call_next()

    def _around(self, layer: Middleware, inner: CallNext) -> CallNext:
        async def call() -> Processed:
            await layer(self._delivery, inner)
            # The truth, not what the layer returned: the SDK settles by it.
            return self._outcome(layer)

        return call

    def _outcome(self, layer: Middleware) -> Processed:
        if self._result is not None:
            return self._result
        if self._error is not None:
            # The layer swallowed the processing's failure: it is still a failure.
            raise self._error
        name = getattr(layer, "__qualname__", repr(layer))
        raise RuntimeError(
            f"middleware {name} returned, but the command was not processed "
            "(call_next() was not called, or failed)"
        )

    async def _innermost(self) -> Processed:
        if self._called:
            # Processing twice would claim the inbox twice and ack once: refuse.
            raise RuntimeError("call_next() called twice for one delivery")
        self._called = True
        try:
            self._result = await self._process(self._delivery)
        except Exception as exc:
            self._error = exc
            raise
        return self._result
