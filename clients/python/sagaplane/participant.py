"""Participants: step and compensation handlers, run once per step, answered through the outbox.

A :class:`Participant` consumes its service's queue (``sagaplane.participant.<service>``,
bound to every registered action) and handles each command in ONE local transaction::

    BEGIN
      claim the inbox row of (step_id, kind)          -- blocks a concurrent copy
      new?  SAVEPOINT; run the handler on ctx.tx      -- a raising handler rolls back
            only its own writes; the failure is the outcome
      seen? reuse the stored outcome, unless it was a failure and this is a later
            attempt (then run the handler again)
      write the outcome to the inbox and the StepReply to the outbox
    COMMIT; then ack the AMQP message

So the handler's writes, "this step was handled" and "its reply will be sent" commit
together or not at all, and a redelivered or retried command is answered from the inbox
with the stored outcome, under the NEW command's attempt and token (see
``sql/participant/0001_inbox.sql``). The replies are published by the SDK's
:class:`~sagaplane.relay.OutboxRelay`, running inside the participant.

An execute command for a step whose compensation already ran here is not run: it is
answered with a non-retryable ``StepAlreadyCompensated`` failure, so that an action
never lands after its undo (a late redelivery, or a retry racing a timeout).

A message that is not a valid StepCommand (garbage, ids or names past the wire's limits,
JSON that PostgreSQL cannot hold), or names an action this service did not register, is
dead-lettered to ``sagaplane.dead-letter`` with its reason
(:class:`~sagaplane.consuming.DeadLetters`), alone. What a handler produces is checked
too: an output past :data:`~sagaplane.limits.MAX_OUTPUT_BYTES` or holding what the
coordinator refuses fails the step (non-retryably) and rolls the handler's writes back,
and an error message is cleaned and cut (:func:`~sagaplane.limits.clean_text`) so that
it can always be stored and sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

import aio_pika
import psycopg
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from google.protobuf.message import DecodeError
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sagaplane import backoff, batch, migrations, structs, topology
from sagaplane.consuming import DeadLetters
from sagaplane.consuming import settle as _settle
from sagaplane.errors import ConfigurationError, NonRetryableError, StepFailed
from sagaplane.limits import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_OUTPUT_BYTES,
    MAX_TEXT_CHARS,
    clean_text,
)
from sagaplane.outbox import INSERT_ONE, OutboundMessage, insert_params
from sagaplane.queries import q
from sagaplane.relay import OutboxRelay
from sagaplane.v1 import messages_pb2

__all__ = ["Handler", "Participant", "StepContext", "StepKind", "participant_migrations"]

log = logging.getLogger(__name__)

# Backoff while PostgreSQL is unreachable: the command is held (unacked) and retried in
# process, so an outage does not burn the queue's delivery limit and dead-letter it.
_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 5.0


class StepKind(StrEnum):
    """Whether a command runs a step's action or its compensation (as in message ids)."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


_KIND_FROM_PROTO = {
    messages_pb2.COMMAND_KIND_EXECUTE: StepKind.EXECUTE,
    messages_pb2.COMMAND_KIND_COMPENSATE: StepKind.COMPENSATE,
}
_KIND_TO_PROTO = {v: k for k, v in _KIND_FROM_PROTO.items()}


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a handler is given: the command, and the transaction to write in."""

    saga_id: str
    """The saga the step belongs to."""
    saga_name: str
    """The saga's type name."""
    step_id: str
    """The step's id; stable across attempts (a good idempotency key downstream)."""
    step_name: str
    """The step's name within the saga."""
    attempt: int
    """1 for the first dispatch, counting up on every retry."""
    kind: StepKind
    """Execute (the step's action) or compensate (its undo)."""
    action: str
    """The action being run (the handler's registered name)."""
    input: dict[str, Any]
    """The step's input."""
    context: dict[str, Any]
    """The saga's context."""
    output: dict[str, Any] | None
    """For a compensation: what the step's action returned; None for an execution."""
    message_id: str
    """The AMQP message id of the command (for logs)."""
    tx: AsyncConnection[Any]
    """The connection, inside the command's transaction (a savepoint). Write with it and
    do not commit or roll back: the SDK commits your writes with the inbox row and the
    reply (a handler that ends the transaction is a bug: its command is requeued). To
    publish domain events atomically, :func:`sagaplane.outbox.enqueue` them on it."""


Handler = Callable[[StepContext], Awaitable[Mapping[str, Any] | None]]
"""``async def handler(ctx: StepContext) -> dict | None``: the step's output (None: ``{}``).

Raise :class:`~sagaplane.errors.NonRetryableError` for a failure that retrying cannot
fix; any other exception is a retryable failure (see :mod:`sagaplane.errors`).
"""

H = TypeVar("H", bound=Handler)


def participant_migrations() -> list[migrations.Migration]:
    """What a participant's database needs: the outbox, then the inbox."""
    return migrations.outbox_migrations() + migrations.load(
        "sagaplane", "sql/participant", "participant"
    )


class Participant:
    """A service that executes saga steps.

    Register handlers with :meth:`step` and :meth:`compensation`, then ``await run()``
    (until SIGTERM or cancellation), or use ``async with participant:`` /
    :meth:`start` / :meth:`stop`.

    ``prefetch`` bounds the commands handled at once; each holds one of ``pool_size``
    database connections while it runs (the outbox relay borrows one per cycle).
    ``shutdown_timeout`` is how long :meth:`stop` lets in-flight handlers finish before
    cancelling them (their commands are then redelivered, and the inbox answers any
    that did commit). With ``migrate`` (the default), :meth:`start` applies the outbox
    and inbox migrations first.

    ``reply_exchange`` is where replies are published (routing key
    :data:`~sagaplane.topology.REPLIES_ROUTING_KEY`); leave it at
    :data:`~sagaplane.topology.REPLIES_EXCHANGE`, the coordinator's. It is a hook for a
    proxy (or a fault-injection test) that sits between participants and the
    coordinator and forwards replies itself; that exchange must exist (and have a queue
    bound for the routing key) before replies are published, or they count as failed
    publishes.
    """

    def __init__(
        self,
        service: str,
        *,
        amqp_url: str,
        database_url: str,
        prefetch: int = 32,
        pool_size: int = 10,
        migrate: bool = True,
        shutdown_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        relay_poll_interval: float = 1.0,
        reply_exchange: str = topology.REPLIES_EXCHANGE,
    ) -> None:
        if not service:
            raise ConfigurationError("service must not be empty")
        if prefetch < 1 or pool_size < 1:
            raise ConfigurationError("prefetch and pool_size must be at least 1")
        if not reply_exchange:
            raise ConfigurationError("reply_exchange must not be empty")
        self.service = service
        self._amqp_url = amqp_url
        self._database_url = database_url
        self._prefetch = prefetch
        self._pool_size = pool_size
        self._migrate = migrate
        self._shutdown_timeout = shutdown_timeout
        self._connect_timeout = connect_timeout
        self._relay_poll_interval = relay_poll_interval
        self._reply_exchange = reply_exchange
        self._name = f"sagaplane-participant-{service}"

        self._handlers: dict[tuple[StepKind, str], Handler] = {}
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._relay: OutboxRelay | None = None
        self._dead_letters: DeadLetters | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._started = False
        self._shutdown_task: asyncio.Task[None] | None = None

    # -- registration ---------------------------------------------------------------

    def step(self, action: str) -> Callable[[H], H]:
        """Register the decorated coroutine function as the handler of ``action``."""
        return self._register(StepKind.EXECUTE, action)

    def compensation(self, action: str) -> Callable[[H], H]:
        """Register the decorated coroutine function as the compensation ``action``.

        Compensations are retried until they succeed or fail non-retryably, so make them
        tolerate "nothing to undo" (``ctx.output`` may be empty).
        """
        return self._register(StepKind.COMPENSATE, action)

    @property
    def dead_lettered(self) -> Mapping[str, int]:
        """Commands this participant dead-lettered, by cause (``undecodable``,
        ``unknown_action``, ``failed``); see :mod:`sagaplane.consuming`."""
        return self._dead_letters.counts if self._dead_letters is not None else {}

    @property
    def actions(self) -> list[str]:
        """Every registered action (the routing keys the queue is bound to)."""
        return list(dict.fromkeys(action for _, action in self._handlers))

    def _register(self, kind: StepKind, action: str) -> Callable[[H], H]:
        if not action:
            raise ConfigurationError("action must not be empty")

        def decorator(handler: H) -> H:
            if self._started:
                # The queue's bindings are declared at start; a later handler would never
                # receive anything.
                raise ConfigurationError(f"register {action!r} before start()")
            if (kind, action) in self._handlers:
                raise ConfigurationError(f"{kind} handler for {action!r} registered twice")
            self._handlers[(kind, action)] = handler
            return handler

        return decorator

    # -- lifecycle --------------------------------------------------------------------

    async def migrate(self) -> list[migrations.Migration]:
        """Apply the outbox and inbox migrations not applied yet; returns those applied."""
        # Reading the package's SQL files is file I/O: keep it off the event loop.
        wanted = await asyncio.to_thread(participant_migrations)
        async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
            applied = await migrations.apply(conn, wanted)
        for m in applied:
            log.info("applied migration %s/%04d_%s", m.component, m.version, m.name)
        return applied

    async def start(self) -> None:
        """Migrate, connect, declare the queue, start the relay and consuming.

        Calling it twice does nothing; a stopped participant cannot be restarted. If
        anything fails, what was started is stopped and the error is raised.
        """
        if self._shutdown_task is not None:
            raise RuntimeError("a stopped Participant cannot be restarted")
        if self._started:
            return
        if not self._handlers:
            raise ConfigurationError("register at least one step or compensation handler")
        self._started = True
        try:
            if self._migrate:
                await self.migrate()
            self._pool = AsyncConnectionPool(
                self._database_url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                open=False,
                name=self._name,
                # The SDK sends BEGIN itself, batched with the inbox claim (see _process).
                kwargs={"autocommit": True},
            )
            await self._pool.open(wait=True, timeout=self._connect_timeout)
            self._connection = await aio_pika.connect_robust(
                self._amqp_url,
                timeout=self._connect_timeout,
                client_properties={"connection_name": self._name},
            )
            # The relay shares the connection and opens its own (confirming) channel.
            self._relay = OutboxRelay(
                self._pool,
                self._connection,
                poll_interval=self._relay_poll_interval,
                connection_name=self._name,
            )
            await self._relay.start()
            self._dead_letters = DeadLetters(
                self._connection, queue=topology.participant_queue(self.service)
            )
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=self._prefetch)
            # Declares the core topology (exchanges, replies and dead-letter queues) too.
            self._queue = await topology.declare_participant_queue(
                self._channel, self.service, self.actions
            )
            self._consumer_tag = await self._queue.consume(self._on_message)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "participant %s consuming %s (%s)",
            self.service,
            topology.participant_queue(self.service),
            ", ".join(self.actions),
        )

    async def stop(self) -> None:
        """Stop gracefully; safe to call twice, concurrently, or before start() finished.

        In order: stop consuming; let in-flight commands finish (up to
        ``shutdown_timeout``, then cancel them); publish the replies already committed
        (best effort) and stop the relay; close the AMQP connection and the pool.
        """
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown(), name=f"{self._name}-stop")
        # Shielded: a caller that is cancelled must not leave the shutdown half done.
        await asyncio.shield(self._shutdown_task)

    async def run(self, *, handle_sigterm: bool = True) -> None:
        """Start, then serve until :meth:`stop`, SIGTERM or cancellation; then stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        # SIGINT is left alone: asyncio.run() turns it into cancellation, which stops too.
        watch_sigterm = handle_sigterm and threading.current_thread() is threading.main_thread()
        if watch_sigterm:
            loop.add_signal_handler(signal.SIGTERM, self._stop_requested.set)
        try:
            await self._stop_requested.wait()
        finally:
            if watch_sigterm:
                loop.remove_signal_handler(signal.SIGTERM)
            await self.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _shutdown(self) -> None:
        self._stop_requested.set()
        if self._queue is not None and self._consumer_tag is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the channel may already be gone; closing it below
                log.warning("participant %s: cancelling the consumer: %s", self.service, exc)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=self._shutdown_timeout)
            if pending:
                log.warning(
                    "participant %s: cancelling %d commands still running after %.1fs; "
                    "they will be redelivered",
                    self.service,
                    len(pending),
                    self._shutdown_timeout,
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self._relay is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    # Replies committed since the relay's last cycle go out now rather than
                    # at the next start.
                    await self._relay.relay_once()
            except Exception as exc:
                log.warning("participant %s: final relay cycle: %s", self.service, exc)
            try:
                await self._relay.stop()
            except Exception:
                log.exception("participant %s: the outbox relay had crashed", self.service)
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._pool is not None:
            await self._pool.close()
        log.info("participant %s stopped", self.service)

    # -- handling one command -----------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Handled in a task of our own, not aio-pika's: a lost channel cancels the
        # library's tasks, and a handler cut off mid-transaction helps nobody (its reply
        # is safe in the outbox; the redelivered copy is answered from the inbox).
        if self._stop_requested.is_set():
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        task = asyncio.create_task(
            self._handle(message), name=f"{self._name}-command-{message.message_id}"
        )
        self._inflight.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _handle catches everything it expects; anything else is a bug worth shouting.
            log.critical(
                "participant %s: %s crashed",
                self.service,
                task.get_name(),
                exc_info=task.exception(),
            )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        assert self._dead_letters is not None
        try:
            command = _decode(message)
        except _Undecodable as exc:
            await self._dead_letters.send(message, str(exc), cause="undecodable")
            return
        except Exception as exc:  # a decoder bug must not loop the message
            log.exception("participant %s: decoding %s failed", self.service, message.message_id)
            await self._dead_letters.send(
                message, f"cannot be decoded: {type(exc).__name__}", cause="undecodable"
            )
            return
        kind = _KIND_FROM_PROTO[command.kind]
        handler = self._handlers.get((kind, command.action))
        if handler is None:
            await self._dead_letters.send(
                message,
                f"participant {self.service} has no {kind} handler for action {command.action!r}",
                cause="unknown_action",
            )
            return
        failures = 0
        while True:
            try:
                await self._process(message, command, kind, handler)
                break
            except _TRANSIENT as exc:
                failures += 1
                if self._stop_requested.is_set():
                    await _settle(message.nack(requeue=True), message)
                    return
                delay = backoff.delay(failures, initial=_MIN_BACKOFF, maximum=_MAX_BACKOFF)
                log.warning(
                    "participant %s: message %s: database unavailable (%s: %s); retrying in %.1fs",
                    self.service,
                    message.message_id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop_requested.wait()
            except Exception as exc:
                # Not the handler's failure (that is caught and replied): a bug or a bad
                # row. Requeued; on its last delivery it is dead-lettered with the reason.
                log.exception(
                    "participant %s: message %s could not be processed; requeueing",
                    self.service,
                    message.message_id,
                )
                await self._dead_letters.requeue(message, f"{type(exc).__name__}: {exc}")
                return
        # Only now, after COMMIT: a crash before this line redelivers the command, and
        # the inbox answers it without running the handler again.
        await _settle(message.ack(), message)

    async def _process(
        self,
        message: AbstractIncomingMessage,
        command: messages_pb2.StepCommand,
        kind: StepKind,
        handler: Handler,
    ) -> None:
        """Handle one command in one transaction: claim, run or replay, store, reply.

        Three round trips when the command is new: ``BEGIN; claim; SAVEPOINT``, the
        handler's own statements, ``store; reply; COMMIT``. The statements around the
        handler go as one batch each (client-side bound, simple query protocol): every
        round trip here costs more CPU than the statement it carries.
        """
        assert self._pool is not None
        key = {"step_id": command.step_id, "kind": kind.value}
        message_id = _message_id(message)
        async with self._pool.connection() as conn:
            cur = AsyncClientCursor(conn)
            try:
                claim = {
                    **key,
                    "saga_id": command.saga_id,
                    "action": command.action,
                    "message_id": message_id,
                    "attempt": command.attempt,
                }
                [[(claimed, compensated)]] = await batch.run(
                    cur, [("BEGIN", None), (_CLAIM, claim), (_SAVEPOINT, None)]
                )
                previous: _Outcome | None = None
                if not claimed:
                    [[row]] = await batch.run(
                        cur, [(_RELEASE, None), (_LOCK_STORED, key), (_SAVEPOINT, None)]
                    )
                    compensated = bool(row[-1])
                    previous = None if row[1] is None else _Outcome.from_row(row[:-1])

                finish: list[batch.Statement] = []
                if previous is not None and previous.final_for(command.attempt):
                    log.info(
                        "participant %s: %s %s of step %s (attempt %d) was handled already; "
                        "re-sending its outcome",
                        self.service,
                        kind,
                        command.action,
                        command.step_id,
                        command.attempt,
                    )
                    outcome = previous
                    finish.append((_REPLAYED, key))
                else:
                    if kind is StepKind.EXECUTE and compensated:
                        outcome = _Outcome.failure(
                            "StepAlreadyCompensated",
                            "the step's compensation already ran here; not executing it after",
                            retryable=False,
                        )
                    else:
                        ctx = _context(message, command, kind, conn)
                        outcome = await self._run(conn, handler, ctx)
                        if not outcome.succeeded:
                            # The handler's writes go; the claim, outcome and reply stay.
                            finish.append((_ROLLBACK_TO_SAVEPOINT, None))
                    params = {**key, "message_id": message_id, **outcome.params(command.attempt)}
                    finish.append((_STORE, params))
                reply = _reply(command, kind, outcome, self._reply_exchange)
                # COMMIT releases the handler's savepoint with everything else.
                finish += [(INSERT_ONE, insert_params(reply)), ("COMMIT", None)]
                await batch.run(cur, finish)
            except BaseException:
                await batch.rollback_after_error(conn)
                raise

    async def _run(
        self, conn: AsyncConnection[Any], handler: Handler, ctx: StepContext
    ) -> _Outcome:
        try:
            returned = await handler(ctx)
            output, output_json = _checked_output(returned)
            status = conn.info.transaction_status
            if status is TransactionStatus.INERROR:
                raise _HandlerSwallowedError(
                    "a statement of the handler failed and the handler returned anyway; "
                    "its transaction cannot be used"
                )
            if status is not TransactionStatus.INTRANS:
                # The handler committed or rolled back the SDK's transaction: what it
                # wrote is no longer atomic with the inbox row and the reply. Not the
                # step's failure to report; a bug to fix (the command is requeued).
                raise _HandlerEndedTransaction(
                    f"the {ctx.kind} handler of {ctx.action!r} ended the SDK's transaction "
                    "(commit or rollback on ctx.tx); write on ctx.tx and let the SDK commit"
                )
        except _HandlerEndedTransaction:
            raise
        except Exception as exc:
            if conn.broken:
                # Not the step's fault: the transaction is lost. Retried as a whole.
                raise _ConnectionLost(str(exc)) from exc
            outcome = _Outcome.from_exception(exc)
            log.log(
                logging.INFO if isinstance(exc, StepFailed) else logging.WARNING,
                "participant %s: %s %s of step %s (attempt %d) failed: %s: %s",
                self.service,
                ctx.kind,
                ctx.action,
                ctx.step_id,
                ctx.attempt,
                outcome.error_type,
                outcome.error_message,
                exc_info=None if isinstance(exc, StepFailed) else exc,
            )
            return outcome
        return _Outcome(succeeded=True, output=output, output_json=output_json)


# -- the inbox's statements (sql/queries.sql) --------------------------------------------

_SAVEPOINT = q("handler_savepoint")
_ROLLBACK_TO_SAVEPOINT = q("handler_rollback")
_RELEASE = q("handler_release")
_CLAIM = q("inbox_claim")
_LOCK_STORED = q("inbox_lock_stored")
_STORE = q("inbox_store")
_REPLAYED = q("inbox_replayed")

_TRANSIENT: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    PoolTimeout,
)


class _ConnectionLost(psycopg.OperationalError):
    """The connection broke while a handler ran."""


class _HandlerSwallowedError(StepFailed):
    """A handler went on after one of its statements failed (retryable, like any bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_type="InFailedSqlTransaction", retryable=True)


class _HandlerEndedTransaction(RuntimeError):
    """A handler committed or rolled back the transaction the SDK gave it."""


class _Undecodable(ValueError):
    """The message is not a StepCommand this SDK can handle."""


@dataclass(frozen=True, kw_only=True)
class _Outcome:
    """What a handler run produced, as stored in the inbox and sent in replies."""

    succeeded: bool
    attempt: int = 0
    """The attempt whose handler run produced it (stored outcomes only)."""
    output: dict[str, Any] | None = None
    output_json: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_retryable: bool | None = None

    @classmethod
    def failure(cls, error_type: str, message: str, *, retryable: bool) -> _Outcome:
        # Whatever a handler raised is reported: NUL replaced (the inbox could not store
        # it, and the command would loop), and cut to the wire's limits.
        return cls(
            succeeded=False,
            error_type=clean_text(error_type, MAX_ERROR_TYPE_CHARS),
            error_message=clean_text(message, MAX_ERROR_MESSAGE_CHARS),
            error_retryable=retryable,
        )

    @classmethod
    def from_exception(cls, exc: Exception) -> _Outcome:
        if isinstance(exc, StepFailed):
            return cls.failure(exc.error_type, exc.message, retryable=exc.retryable)
        # Anything else may be transient (a timeout, a deadlock, a bug fixed by a deploy).
        return cls.failure(type(exc).__name__, str(exc), retryable=True)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> _Outcome:
        attempt, outcome, output, error_type, error_message, error_retryable = row
        if outcome == "succeeded":
            return cls(succeeded=True, attempt=attempt, output=output)
        return cls(
            succeeded=False,
            attempt=attempt,
            error_type=error_type,
            error_message=error_message,
            error_retryable=bool(error_retryable),
        )

    def final_for(self, attempt: int) -> bool:
        """Whether a command of ``attempt`` gets this outcome rather than a new run.

        Success is final. A failure is final only for its own attempt (a redelivered
        copy): the coordinator sends a later attempt only when it decided to try again
        (a retryable failure within its policy, a timeout, or an operator's
        ResolveCompensation RETRY after a non-retryable one), so the handler runs again.
        """
        return self.succeeded or attempt <= self.attempt

    def params(self, attempt: int) -> dict[str, Any]:
        return {
            "attempt": attempt,
            "outcome": "succeeded" if self.succeeded else "failed",
            "output": self.output_json,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "error_retryable": self.error_retryable,
        }


def _decode(message: AbstractIncomingMessage) -> messages_pb2.StepCommand:
    """Check everything the inbox or a handler relies on; raises _Undecodable with why."""
    expected = messages_pb2.StepCommand.DESCRIPTOR.full_name
    if message.type and message.type != expected:
        raise _Undecodable(f"type is {message.type!r}, not {expected!r}")
    if len(message.body) > MAX_MESSAGE_BYTES:
        raise _Undecodable(f"the body is {len(message.body)} bytes; at most {MAX_MESSAGE_BYTES}")
    command = messages_pb2.StepCommand()
    try:
        command.ParseFromString(message.body)
    except (DecodeError, ValueError, TypeError) as exc:
        raise _Undecodable(f"not a StepCommand: {exc}") from exc
    if not command.saga_id or not command.step_id or not command.action:
        raise _Undecodable("StepCommand lacks saga_id, step_id or action")
    if command.kind not in _KIND_FROM_PROTO:
        raise _Undecodable(f"StepCommand has no valid kind ({command.kind})")
    if command.attempt < 1:
        raise _Undecodable("StepCommand has no attempt")
    for field, limit in _TEXT_LIMITS.items():
        value = getattr(command, field)
        if len(value) > limit:
            raise _Undecodable(f"{field} is longer than {limit} characters")
        if "\x00" in value:
            raise _Undecodable(f"{field} contains a NUL character")
    try:
        _payloads(command)
    except structs.InvalidJson as exc:
        raise _Undecodable(str(exc)) from exc
    return command


def _payloads(
    command: messages_pb2.StepCommand,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The command's input, context and (compensations only) output; raises InvalidJson."""
    output = None
    if command.kind == messages_pb2.COMMAND_KIND_COMPENSATE and command.HasField("output"):
        output = structs.decode(command.output, "output")
    return (
        structs.decode(command.input, "input"),
        structs.decode(command.context, "context"),
        output,
    )


# What the inbox stores or the handler is given, with the coordinator's own limits.
_TEXT_LIMITS = {
    "saga_id": MAX_ID_CHARS,
    "step_id": MAX_ID_CHARS,
    "token": MAX_ID_CHARS,
    "action": MAX_TEXT_CHARS,
    "step_name": MAX_TEXT_CHARS,
    "saga_name": MAX_TEXT_CHARS,
}


def _context(
    message: AbstractIncomingMessage,
    command: messages_pb2.StepCommand,
    kind: StepKind,
    conn: AsyncConnection[Any],
) -> StepContext:
    input, context, output = _payloads(command)  # checked by _decode already
    return StepContext(
        saga_id=command.saga_id,
        saga_name=command.saga_name,
        step_id=command.step_id,
        step_name=command.step_name,
        attempt=command.attempt,
        kind=kind,
        action=command.action,
        input=input,
        context=context,
        output=output,
        message_id=_message_id(message),
        tx=conn,
    )


def _message_id(message: AbstractIncomingMessage) -> str:
    # Anyone may publish to the commands exchange: the inbox must be able to store it.
    return clean_text(message.message_id or "", MAX_TEXT_CHARS)


def _checked_output(returned: object) -> tuple[dict[str, Any], str]:
    if returned is None:
        return {}, "{}"
    if not isinstance(returned, Mapping):
        raise NonRetryableError(
            f"a handler must return a dict or None, not {type(returned).__name__}",
            error_type="InvalidOutput",
        )
    output = dict(returned)
    try:
        # Both encodings the output travels in: the inbox (JSON) and the reply (Struct),
        # and what the coordinator accepts (no NUL, finite numbers, bounded depth).
        text = json.dumps(output, allow_nan=False)
        struct = structs.to_struct(output)
        structs.decode(struct, "output")
    except (TypeError, ValueError, AttributeError) as exc:
        raise NonRetryableError(
            f"the handler's output is not a JSON object Sagaplane can store: {exc}",
            error_type="InvalidOutput",
        ) from exc
    size = struct.ByteSize()
    if size > MAX_OUTPUT_BYTES:
        raise NonRetryableError(
            f"the handler's output is {size} bytes; at most {MAX_OUTPUT_BYTES} are accepted",
            error_type="OutputTooLarge",
        )
    return output, text


def _reply(
    command: messages_pb2.StepCommand, kind: StepKind, outcome: _Outcome, exchange: str
) -> OutboundMessage:
    reply = messages_pb2.StepReply(
        saga_id=command.saga_id,
        step_id=command.step_id,
        attempt=command.attempt,
        kind=_KIND_TO_PROTO[kind],
        token=command.token,
    )
    if outcome.succeeded:
        reply.outcome = messages_pb2.REPLY_OUTCOME_SUCCEEDED
        # The contract sends an output for actions only; a compensation's is kept locally.
        if kind is StepKind.EXECUTE:
            reply.output.CopyFrom(structs.to_struct(outcome.output))
    else:
        reply.outcome = messages_pb2.REPLY_OUTCOME_FAILED
        reply.error.CopyFrom(
            messages_pb2.StepError(
                type=outcome.error_type or "",
                message=outcome.error_message or "",
                retryable=bool(outcome.error_retryable),
            )
        )
    return OutboundMessage(
        # One id per command answered: copies of one command get identical replies, and
        # receivers may deduplicate them on it.
        message_id=f"{command.step_id}:{kind.value}:{command.attempt}:reply",
        exchange=exchange,
        routing_key=topology.REPLIES_ROUTING_KEY,
        message_type=messages_pb2.StepReply.DESCRIPTOR.full_name,
        body=reply.SerializeToString(),
        correlation_id=command.saga_id,
    )
