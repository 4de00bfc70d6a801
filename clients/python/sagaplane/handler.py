"""What a step or compensation handler is given (:class:`StepContext`) and is (:data:`Handler`)."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from sagaplane.wire import StepKind

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
    publish domain events atomically, :func:`sagaplane.outbox.enqueue` them on it."""
    results: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """What the completed steps this one depends on (directly or not) returned, by step
    name: ``ctx.results["create"]["order_id"]``."""
    deadline: datetime | None = None
    """When the handler is cancelled (aware, this host's clock): the attempt's deadline
    less the SDK's margin (see :mod:`sagaplane.deadlines`). None: the command carries no
    deadline, and the handler runs as long as it takes."""
    _cutoff: float | None = field(default=None, repr=False)
    """:attr:`deadline` on ``time.monotonic()``, which no clock change moves."""

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
