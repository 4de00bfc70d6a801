"""What a step or compensation handler is given (:class:`StepContext`) and is (:data:`Handler`)."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncClientCursor, AsyncConnection

from sagaplane import batch as batches
from sagaplane import events
from sagaplane.outbox import OutboundMessage
from sagaplane.wire import Event, StepKind

__all__ = ["Handler", "StepContext"]


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
    publish domain events atomically, :meth:`emit` them."""
    results: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """What the completed steps this one depends on (directly or not) returned, by step
    name: ``ctx.results["create"]["order_id"]``."""
    deadline: datetime | None = None
    """When the handler is cancelled (aware, this host's clock): the attempt's deadline
    less the SDK's margin (see :mod:`sagaplane.deadlines`). None: the command carries no
    deadline, and the handler runs as long as it takes."""
    _cutoff: float | None = field(default=None, repr=False)
    """:attr:`deadline` on ``time.monotonic()``, which no clock change moves."""
    service: str = ""
    """The participant service running the handler (the ``source`` of its events)."""
    _events: list[OutboundMessage] = field(default_factory=list, repr=False)
    """What :meth:`emit` wrote, for the SDK to add to the outbox with the reply."""

    async def emit(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
        id: str | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> Event:
        """Write a domain event (CloudEvents 1.0) to the outbox in the step's transaction:
        published once the step's outcome commits, never if the handler fails (its
        writes, this event among them, roll back). Source: this service; id: a new ULID
        unless given; see :func:`sagaplane.events.emit`. Raises
        :class:`~sagaplane.errors.InvalidEvent` at once for an event that cannot be sent.

        The outbox row goes in the statement batch that stores the step's outcome and
        commits, so an event costs no round trip to PostgreSQL of its own.
        """
        event = events.new_event(
            type, data, source=self.service, subject=subject, id=id, extensions=extensions
        )
        self._events.append(events.outbound(event))
        return event

    async def batch(self, statements: Iterable[batches.Statement]) -> list[list[Any]]:
        """Run ``statements`` on :attr:`tx` in ONE round trip to PostgreSQL; the rows of
        each statement that returns rows, in order (``[SELECT a, UPDATE, SELECT b]``
        gives ``[rows a, rows b]``).

        Each statement is ``(query, params)``, as for ``ctx.tx.execute`` (params None:
        none); the values are bound client-side with the connection's own quoting
        (:mod:`sagaplane.batch`) and all statements go as one simple-protocol query.
        Errors are a single statement's: the first statement that fails raises its
        psycopg error here, the ones after it do not run, and the transaction is
        aborted. Let it propagate (the step fails and all its writes roll back), or run
        the batch inside ``async with ctx.tx.transaction():`` to go on without it.

        For ONE statement over many parameter sets, psycopg's ``executemany`` on a
        cursor of :attr:`tx` is pipelined (one round trip too, server-side binding).
        """
        return await batches.run(AsyncClientCursor(self.tx), statements)

    def time_left(self) -> float:
        """Seconds until the handler is cancelled (0.0 once it passed; ``math.inf``
        without a deadline): to skip work that cannot finish in time."""
        if self._cutoff is None:
            return math.inf
        return max(0.0, self._cutoff - time.monotonic())


Handler = Callable[[StepContext], Awaitable[Mapping[str, Any] | None]]
"""``async def handler(ctx: StepContext) -> dict | None``: the step's output (None: ``{}``).

Raise :class:`~sagaplane.errors.NonRetryableError` for a failure that retrying cannot
fix; any other exception is a retryable failure (see :mod:`sagaplane.errors`).
"""
