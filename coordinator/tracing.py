"""The coordinator's spans (see :mod:`sagaplane.tracing` for the trace's journey).

- The gRPC calls: a server span per SagaCoordinatorService call, by the maintained
  ``opentelemetry-instrumentation-grpc`` (:func:`interceptors`), under the caller's
  ``traceparent``. StartSaga stores its span's context with the saga
  (:func:`saga_context`).
- A step attempt, from dispatch to its reply applied (or its timeout), and the same for
  each compensation attempt; a timer that fired; a saga deadline that passed. Made by
  :func:`observe` from the store's committed transitions, in whichever replica
  committed them: the engine stays pure, and an attempt dispatched before a restart is
  closed by the process that applies its reply, under the span id that its command
  carried (``child_carrier``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import grpc

from coordinator.engine import CommandKind, SagaDeadlinePassed, StepReplied, StepStatus, TimerFired
from coordinator.engine.model import Saga, Step
from coordinator.store.repository import Observed
from sagaplane import tracing, wire

__all__ = ["interceptors", "observe", "saga_context"]

_SERVICE = "sagaplane.v1.SagaCoordinatorService"
_UNTRACED = frozenset({f"/{_SERVICE}/WatchSaga"})


def interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The server interceptor that makes the calls' spans; none while tracing is off or
    ``opentelemetry-instrumentation-grpc`` is not installed (StartSaga then still takes
    the caller's context from the metadata)."""
    if not tracing.enabled():
        return []
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
    except ImportError:
        return []

    def ours(details: Any) -> bool:
        # Health checks and reflection are no saga's business (and come every second).
        # WatchSaga neither: the instrumentation wraps a streaming call as an async
        # generator, and ours is a coroutine that writes with context.write (see
        # api.interceptors); iterating it fails the call.
        method = getattr(details, "method", "") or ""
        if isinstance(method, bytes):
            method = method.decode(errors="replace")
        return bool(method.startswith(f"/{_SERVICE}/")) and method not in _UNTRACED

    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(filter_=ours)  # type: ignore[no-untyped-call, unused-ignore]
    return [interceptor]


def saga_context(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str] | None:
    """The trace context a saga started by this call belongs to: the call's span, or
    the caller's ``traceparent`` when no span was made here; None while tracing is off."""
    if not tracing.enabled():
        return None
    return tracing.carrier() or tracing.from_metadata(context.invocation_metadata())


def observe(committed: Sequence[Observed]) -> None:
    """The spans of committed transitions (a store observer)."""
    if not tracing.enabled():
        return
    now = time.time_ns()
    for o in committed:
        trace = o.trace_context
        if not trace or o.before is None or o.transition.ignored is not None:
            continue
        event = o.event
        if isinstance(event, StepReplied):
            step = o.before.step_by_id(event.step_id)
            if step is not None:
                _attempt(o.before, step, event.kind, event.attempt, trace, now, event.error)
        elif isinstance(event, TimerFired):
            step = o.before.step_by_id(event.step_id)
            if step is None:
                continue
            attributes = _attributes(o.before, step)
            tracing.record(f"timer {step.name}", parent=trace, end_ns=now, attributes=attributes)
            # A timer of an attempt in flight is its timeout: the attempt ends here.
            if step.status is StepStatus.STARTED:
                _attempt(
                    o.before, step, CommandKind.EXECUTE, step.attempts, trace, now, "timed out"
                )
            elif step.status is StepStatus.COMPENSATING:
                kind = CommandKind.COMPENSATE
                _attempt(o.before, step, kind, step.compensation_attempts, trace, now, "timed out")
        elif isinstance(event, SagaDeadlinePassed):
            tracing.record(
                "saga deadline passed",
                parent=trace,
                end_ns=now,
                attributes={"sagaplane.saga_id": o.before.id, "sagaplane.saga": o.before.name},
            )


def _attempt(
    saga: Saga,
    step: Step,
    kind: CommandKind,
    attempt: int,
    trace: Any,
    now: int,
    error: str | None,
) -> None:
    """The span of one attempt, from its dispatch (its deadline less its timeout)."""
    start = now
    if step.deadline_at is not None:
        start = min(now, _ns(step.deadline_at - step.timeout))
    verb = "step" if kind is CommandKind.EXECUTE else "compensate"
    action = step.action if kind is CommandKind.EXECUTE else (step.compensation or "")
    tracing.record(
        f"{verb} {step.name}",
        parent=trace,
        key=wire.command_id(step.id, kind.value, attempt),
        start_ns=start,
        end_ns=now,
        attributes=_attributes(saga, step)
        | {"sagaplane.attempt": attempt, "sagaplane.action": action},
        error=error,
    )


def _attributes(saga: Saga, step: Step) -> dict[str, str | int]:
    return {"sagaplane.saga_id": saga.id, "sagaplane.saga": saga.name, "sagaplane.step": step.name}


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)
