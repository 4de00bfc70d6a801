"""One command, one local transaction: the inbox claim, the handler, its outcome, the reply.

Each command a participant takes is handled in ONE transaction of the service's own
database::

    BEGIN
      claim the inbox row of (step_id, kind)          -- blocks a concurrent copy
      new?  SAVEPOINT; run the handler on ctx.tx      -- a raising handler rolls back
            only its own writes; the failure is the outcome
      seen? reuse the stored outcome, unless it was a failure and this is a later
            attempt (then run the handler again)
      write the outcome to the inbox and the StepReply to the outbox
    COMMIT

So the handler's writes, "this step was handled" and "its reply will be sent" commit
together or not at all, and a redelivered or retried command is answered from the inbox
with the stored outcome, under the NEW command's attempt and token (see
``sql/participant/0001_inbox.sql``; the statements are in ``sql/queries.sql``). The
replies are published by the SDK's :class:`~sagaplane.relay.OutboxRelay`, running inside
the participant.

An execute command for a step whose compensation already ran here is not run: it is
answered with a non-retryable ``StepAlreadyCompensated`` failure, so that an action
never lands after its undo (a late redelivery, or a retry racing a timeout).

A command with a deadline (:mod:`sagaplane.deadlines`) runs under it twice over. The
handler is cancelled at the deadline's cutoff: its writes roll back to the savepoint,
and the outcome is a retryable ``DeadlineExceeded`` failure, ``deadline exceeded after
2.0s``, committed with the claim and the reply. And PostgreSQL ends the attempt by
itself at the deadline: ``SET LOCAL statement_timeout`` and
``idle_in_transaction_session_timeout`` (and ``transaction_timeout`` on PostgreSQL 17
and later) go in the claim's round trip, so a handler that blocks the event loop or
ignores its cancellation still cannot keep a connection, a row lock or the inbox claim
past the attempt (the command is then retried as after a lost connection, and
answered with the failure at once). Before PostgreSQL 17 the bound is per statement
and per idle stretch, each of the time left at the claim: a statement the SDK cannot
cancel may end later by as much time as the attempt had used when it started. A
command whose time is up before its handler could start (late from the queue, or after
waiting for a copy of itself) is answered with that failure without running the
handler.

What a handler produces is checked: an output past
:data:`~sagaplane.limits.MAX_OUTPUT_BYTES` or holding what the coordinator refuses
fails the step (non-retryably) and rolls the handler's writes back, and an error
message is cleaned and cut (:func:`~sagaplane.limits.clean_text`) so that it can always
be stored and sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from sagaplane import batch, signing, structs, topology, tracing, wire
from sagaplane.deadlines import Deadline
from sagaplane.errors import DeadlineExceeded, NonRetryableError, StepFailed
from sagaplane.handler import Handler, StepContext
from sagaplane.limits import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_OUTPUT_BYTES,
    MAX_TEXT_CHARS,
    clean_text,
)
from sagaplane.metrics import ParticipantMetrics
from sagaplane.middleware import Processed
from sagaplane.outbox import INSERT_ONE, OutboundMessage, insert_params
from sagaplane.queries import q
from sagaplane.v1 import messages_pb2
from sagaplane.wire import StepKind

__all__ = ["Inbox"]

# The participant's log, as one name for everything a participant does.
log = logging.getLogger("sagaplane.participant")

T = TypeVar("T")

_SAVEPOINT = q("handler_savepoint")
_ROLLBACK_TO_SAVEPOINT = q("handler_rollback")
_RELEASE = q("handler_release")
_CLAIM = q("inbox_claim")
_LOCK_STORED = q("inbox_lock_stored")
_STORE = q("inbox_store")
_REPLAYED = q("inbox_replayed")
_STATEMENT_TIMEOUT = q("deadline_statement_timeout")
_IDLE_TIMEOUT = q("deadline_idle_timeout")
_TRANSACTION_TIMEOUT = q("deadline_transaction_timeout")

_TRANSACTION_TIMEOUT_SINCE = 170000
"""The server_version_num of the first PostgreSQL with ``transaction_timeout``."""


class Inbox:
    """Handles commands of ``service`` in transactions on ``pool``; replies go to
    ``reply_exchange`` (through the outbox)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        *,
        service: str,
        reply_exchange: str,
        metrics: ParticipantMetrics | None = None,
        signing_keys: Sequence[bytes] | None = None,
    ) -> None:
        self._pool = pool
        self._service = service
        self._signing_keys = signing_keys
        self._reply_exchange = reply_exchange
        self._metrics = metrics

    async def process(
        self,
        command: messages_pb2.StepCommand,
        kind: StepKind,
        handler: Handler,
        *,
        message_id: str | None,
        deadline: Deadline | None = None,
        label: str | None = None,
    ) -> Processed:
        """Handle one command in one transaction: claim, run or replay, store, reply;
        the handler and the transaction under ``deadline`` (None: no deadline).
        ``label`` is the action as the metrics count it (None: the command's action;
        "" for an action this participant has no handler for, which a sender chose).

        Returns, once the transaction has committed, whether the handler ran
        (:attr:`~Processed.HANDLED`) or the reply was the inbox's stored outcome
        (:attr:`~Processed.REPLAYED`) or a refusal (:attr:`~Processed.REFUSED`). Raises
        psycopg's OperationalError (or the pool's PoolTimeout) when the database is
        unavailable, and anything else for a bug or a bad row; nothing is committed then.

        Three round trips when the command is new: ``BEGIN; claim; SAVEPOINT``, the
        handler's own statements, ``store; reply; COMMIT``. The statements around the
        handler go as one batch each (client-side bound, simple query protocol): every
        round trip here costs more CPU than the statement it carries. PostgreSQL's
        limits for the deadline go in the first one (one more round trip, to renew
        them, only if the claim waited for a copy of this command).
        """
        key = {"step_id": command.step_id, "kind": kind.value}
        cleaned_id = _message_id(message_id)
        processed = Processed.HANDLED
        ran: float | None = None  # seconds the handler ran, if it did
        async with self._pool.connection() as conn:
            cur = AsyncClientCursor(conn)
            try:
                claim = {
                    **key,
                    "saga_id": command.saga_id,
                    "action": command.action,
                    "message_id": cleaned_id,
                    "attempt": command.attempt,
                }
                limits_set = time.monotonic()
                limits = _postgres_limits(deadline, conn)
                [[(claimed, compensated)]] = await batch.run(
                    cur, [("BEGIN", None), (_CLAIM, claim), *limits, (_SAVEPOINT, None)]
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
                        self._service,
                        kind,
                        command.action,
                        command.step_id,
                        command.attempt,
                    )
                    outcome = previous
                    processed = Processed.REPLAYED
                    finish.append((_REPLAYED, key))
                else:
                    if kind is StepKind.EXECUTE and compensated:
                        outcome = _Outcome.failure(
                            "StepAlreadyCompensated",
                            "the step's compensation already ran here; not executing it after",
                            retryable=False,
                        )
                        processed = Processed.REFUSED
                    elif deadline is not None and deadline.handler_left() <= 0:
                        outcome = _Outcome.failure(
                            "DeadlineExceeded", deadline.exceeded_before_start(), retryable=True
                        )
                        self._log_failure(command, kind, outcome)
                    else:
                        waited = time.monotonic() - limits_set
                        if deadline is not None and limits and waited > deadline.margin:
                            # The claim waited (for a copy of this command) longer than the
                            # margin: PostgreSQL's limits counted from before. Renewed.
                            await batch.run(cur, _postgres_limits(deadline, conn))
                        ctx = _context(cleaned_id, command, kind, conn, deadline, self._service)
                        began = time.monotonic()
                        outcome = await self._run(conn, handler, ctx, deadline)
                        ran = time.monotonic() - began
                        if not outcome.succeeded:
                            tracing.fail_current(f"{outcome.error_type}: {outcome.error_message}")
                            # The handler's writes go; the claim, outcome and reply stay.
                            finish.append((_ROLLBACK_TO_SAVEPOINT, None))
                        else:
                            # Its events (ctx.emit) commit with its writes and the outcome.
                            finish += [(INSERT_ONE, insert_params(m)) for m in ctx._events]
                    params = {**key, "message_id": cleaned_id, **outcome.params(command.attempt)}
                    finish.append((_STORE, params))
                reply = _reply(command, kind, outcome, self._reply_exchange)
                if self._signing_keys is not None:
                    reply = _signed(reply, self._signing_keys, self._service)
                # COMMIT releases the handler's savepoint with everything else.
                finish += [(INSERT_ONE, insert_params(reply)), ("COMMIT", None)]
                await batch.run(cur, finish)
            except psycopg.Error as exc:
                await batch.rollback_after_error(conn)
                if conn.broken and not isinstance(exc, psycopg.OperationalError):
                    # PostgreSQL ended the session (the deadline's idle or transaction
                    # timeout, an operator): the transaction is lost, like a connection.
                    raise _ConnectionLost(str(exc)) from exc
                raise
            except BaseException:
                await batch.rollback_after_error(conn)
                raise
        if self._metrics is not None:
            # After the COMMIT: what is counted is what the reply says.
            result = processed.value
            if processed is Processed.HANDLED:
                result = "succeeded" if outcome.succeeded else "failed"
            self._metrics.handled(command.action if label is None else label, kind, result, ran)
        return processed

    async def _run(
        self,
        conn: AsyncConnection[Any],
        handler: Handler,
        ctx: StepContext,
        deadline: Deadline | None,
    ) -> _Outcome:
        try:
            returned = await _until(deadline, handler(ctx))
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
            if isinstance(exc, _AttemptTimedOut):
                self._log_failure(ctx, ctx.kind, outcome)
            else:
                log.log(
                    logging.INFO if isinstance(exc, StepFailed) else logging.WARNING,
                    "participant %s: %s %s of step %s (attempt %d) failed: %s: %s",
                    self._service,
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

    def _log_failure(
        self, command: messages_pb2.StepCommand | StepContext, kind: StepKind, outcome: _Outcome
    ) -> None:
        """A failure the SDK decided on (the deadline), without a traceback."""
        log.warning(
            "participant %s: %s %s of step %s (attempt %d) failed: %s: %s",
            self._service,
            kind,
            command.action,
            command.step_id,
            command.attempt,
            outcome.error_type,
            outcome.error_message,
        )


async def _until(deadline: Deadline | None, work: Awaitable[T]) -> T:
    """``await work``, cancelled at the deadline's cutoff (raising _AttemptTimedOut)."""
    if deadline is None:
        return await work
    timeout = asyncio.timeout(deadline.handler_left())
    try:
        async with timeout:
            result = await work
    except Exception as exc:
        if timeout.expired() or deadline.handler_left() <= 0:
            # Cancelled at the cutoff; or failed after it without being cancelled (its
            # statement cancelled by PostgreSQL's limit, say): the deadline's failure.
            raise _AttemptTimedOut(deadline.exceeded()) from exc
        raise  # the handler's own failure, within its time (its own TimeoutError too)
    if deadline.handler_left() <= 0:
        # Returned after the cutoff without being cancelled: it blocked the event loop,
        # or swallowed the cancellation. Its writes are too late all the same.
        raise _AttemptTimedOut(deadline.exceeded())
    return result


def _postgres_limits(
    deadline: Deadline | None, conn: AsyncConnection[Any]
) -> list[batch.Statement]:
    """``SET LOCAL`` of PostgreSQL's limits at the attempt's end; none without a
    deadline, or once the handler's cutoff has passed (it will not run)."""
    if deadline is None or deadline.handler_left() <= 0:
        return []
    # Rounded up: 0 would mean no limit at all.
    ms = {"ms": max(1, math.ceil(deadline.left() * 1000))}
    limits: list[batch.Statement] = [(_STATEMENT_TIMEOUT, ms), (_IDLE_TIMEOUT, ms)]
    if conn.info.server_version >= _TRANSACTION_TIMEOUT_SINCE:
        limits.append((_TRANSACTION_TIMEOUT, ms))
    return limits


class _ConnectionLost(psycopg.OperationalError):
    """The connection broke while a handler ran."""


class _AttemptTimedOut(DeadlineExceeded):
    """The handler was cancelled at its deadline's cutoff (or returned after it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_type="DeadlineExceeded")


class _HandlerSwallowedError(StepFailed):
    """A handler went on after one of its statements failed (retryable, like any bug)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_type="InFailedSqlTransaction", retryable=True)


class _HandlerEndedTransaction(RuntimeError):
    """A handler committed or rolled back the transaction the SDK gave it."""


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


def _context(
    message_id: str,
    command: messages_pb2.StepCommand,
    kind: StepKind,
    conn: AsyncConnection[Any],
    deadline: Deadline | None,
    service: str,
) -> StepContext:
    input, context, output = wire.payloads(command)  # checked by decode_command already
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
        message_id=message_id,
        tx=conn,
        results=wire.results(command),
        deadline=None if deadline is None else deadline.cutoff_at,
        _cutoff=None if deadline is None else deadline.cutoff,
        service=service,
    )


def _message_id(message_id: str | None) -> str:
    # Anyone may publish to the commands exchange: the inbox must be able to store it.
    return clean_text(message_id or "", MAX_TEXT_CHARS)


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


def _signed(reply: OutboundMessage, keys: Sequence[bytes], service: str) -> OutboundMessage:
    """``reply`` with the headers that sign it (sagaplane.signing) beside the trace's."""
    signature = signing.reply_headers(keys, service, message_id=reply.message_id, body=reply.body)
    return replace(reply, headers={**(reply.headers or {}), **signature})


def _reply(
    command: messages_pb2.StepCommand, kind: StepKind, outcome: _Outcome, exchange: str
) -> OutboundMessage:
    reply = messages_pb2.StepReply(
        saga_id=command.saga_id,
        step_id=command.step_id,
        attempt=command.attempt,
        kind=wire.KIND_TO_PROTO[kind],
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
        message_id=wire.reply_id(command.step_id, kind.value, command.attempt),
        exchange=exchange,
        routing_key=topology.REPLIES_ROUTING_KEY,
        message_type=wire.REPLY_TYPE,
        body=reply.SerializeToString(),
        correlation_id=command.saga_id,
        # The handler's span (current here): the trace goes back with the reply.
        headers=tracing.carrier(),
    )
