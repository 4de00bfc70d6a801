"""Participant middleware: a public wrapper around the processing of each delivered command.

A middleware is a coroutine function ``(delivery, call_next)``::

    async def middleware(delivery: Delivery, call_next: CallNext) -> None:
        ...                            # before the handler: nothing claimed or run yet
        processed = await call_next()  # claim, handler, outcome, reply, COMMIT
        ...                            # after the commit, before the ack

``Participant(..., middleware=[outer, inner])`` runs ``outer`` around ``inner`` around
the processing. :func:`call_next` returns a :class:`Processed` saying what happened;
the SDK settles the message (ack, dead-letter or requeue, by that value) only after the
outermost middleware has returned. What a middleware returns is ignored.

Every message taken from the queue goes through the middleware, including one that is
not a valid StepCommand: ``delivery.refusal`` says why, ``call_next()`` processes
nothing and returns :attr:`Processed.DEAD_LETTERED`.
Only messages delivered while the participant stops are returned to the queue unseen.

A middleware that raises (before or after ``call_next()``), a ``call_next()`` that
raises (a bug, a bad row: the exception goes through the middleware), and a middleware
that returns without having ``call_next()`` succeed all count as a processing failure:
the message is requeued, and dead-lettered with the reason on its last delivery
(:meth:`~sagaplane.consuming.DeadLetters.requeue`). A middleware still running when
:meth:`~sagaplane.participant.Participant.stop` runs out of ``shutdown_timeout`` is
cancelled; its message, unsettled, is redelivered (and answered from the inbox if it
had committed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from aio_pika.abc import AbstractIncomingMessage

from sagaplane.deadlines import Deadline
from sagaplane.v1 import messages_pb2
from sagaplane.wire import StepKind

__all__ = ["CallNext", "Delivery", "Middleware", "Processed"]


class Processed(StrEnum):
    """What processing a delivery did, as ``call_next()`` returns it."""

    HANDLED = "handled"
    """The handler ran; its outcome (success or failure) committed with the reply. Acked."""
    REPLAYED = "replayed"
    """A copy or retry of a command handled before: the inbox's stored outcome committed
    as the reply, the handler did not run. Acked."""
    REFUSED = "refused"
    """An execute after its step's compensation ran here: a ``StepAlreadyCompensated``
    failure committed as the reply, the handler did not run. Acked."""
    DEAD_LETTERED = "dead_lettered"
    """Not processed (see :attr:`Delivery.refusal`): dead-lettered with that reason."""
    REQUEUED = "requeued"
    """Not processed: the participant stopped while the database was unavailable.
    Returned to the queue."""

    @property
    def committed(self) -> bool:
        """Whether a transaction committed a reply (the message is then acked)."""
        return self in (Processed.HANDLED, Processed.REPLAYED, Processed.REFUSED)


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One message taken from the participant's queue, as middleware sees it."""

    message: AbstractIncomingMessage
    """The AMQP message (``message_id``, ``headers``, ``redelivered``, ``body``, ...).
    The SDK settles it: do not ack, nack or reject it."""
    command: messages_pb2.StepCommand | None
    """The decoded and checked StepCommand; None if the message is not a valid one."""
    kind: StepKind | None
    """The command's kind; None when :attr:`command` is."""
    refusal: str | None
    """Why the SDK dead-letters the message instead of processing it (not a valid
    StepCommand); None for one it processes (a command for an action without a handler
    is processed: answered with a non-retryable :class:`~sagaplane.errors.NoHandler`)."""
    deadline: Deadline | None = None
    """When the command's attempt ends here, counted from the message's arrival (see
    :mod:`sagaplane.deadlines`); None without a deadline. Time a middleware spends
    before ``call_next()`` is the handler's time too."""

    @property
    def action(self) -> str | None:
        """The command's action (its routing key); None when :attr:`command` is."""
        return None if self.command is None else self.command.action


CallNext = Callable[[], Awaitable[Processed]]
"""Runs the next middleware, or the processing itself; at most once per middleware."""

Middleware = Callable[[Delivery, CallNext], Awaitable[object]]
"""``async def middleware(delivery: Delivery, call_next: CallNext) -> None`` (see above)."""
