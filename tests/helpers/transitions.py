"""Driving a saga's transitions through the store, as the reply consumer applies a
participant's reply (no broker, no participant): for tests that watch them."""

from __future__ import annotations

from coordinator import engine
from coordinator.engine import CommandKind
from coordinator.store.repository import SagaStore
from sagaplane.v1 import coordinator_pb2 as api

STEPS = ["create", "reserve", "charge"]


def request(name: str = "order.place", **context: str) -> api.StartSagaRequest:
    start = api.StartSagaRequest(
        name=name,
        steps=[
            api.StepSpec(name=step, action=f"shop.{step}", compensation=f"shop.undo_{step}")
            for step in STEPS
        ],
    )
    for key, value in context.items():
        start.context.fields[key].string_value = value
    return start


async def succeed(store: SagaStore, saga_id: str, *, fail: bool = False) -> None:
    """The reply of the step in flight (success, or a final failure), as the reply
    consumer applies it."""
    saga, _ = await store.get(saga_id)
    step = next(s for s in saga.steps if s.status is engine.StepStatus.STARTED)
    await store.apply(
        saga_id,
        engine.StepReplied(
            step_id=step.id,
            kind=CommandKind.EXECUTE,
            attempt=step.attempts,
            token=step.token or "",
            succeeded=not fail,
            output={} if not fail else None,
            error="declined" if fail else None,
            retryable=False,
        ),
    )


async def undo_all(store: SagaStore, saga_id: str) -> None:
    """Succeed every compensation, one after the other, until the saga is compensated."""
    while True:
        saga, _ = await store.get(saga_id)
        step = next((s for s in saga.steps if s.status is engine.StepStatus.COMPENSATING), None)
        if step is None:
            return
        await store.apply(
            saga_id,
            engine.StepReplied(
                step_id=step.id,
                kind=CommandKind.COMPENSATE,
                attempt=step.compensation_attempts,
                token=step.token or "",
                succeeded=True,
            ),
        )


async def fail_compensation(store: SagaStore, saga_id: str, error: str = "undo failed") -> None:
    """The compensation in flight fails for good: the saga is in compensation_failed."""
    saga, _ = await store.get(saga_id)
    step = next(s for s in saga.steps if s.status is engine.StepStatus.COMPENSATING)
    await store.apply(
        saga_id,
        engine.StepReplied(
            step_id=step.id,
            kind=CommandKind.COMPENSATE,
            attempt=step.compensation_attempts,
            token=step.token or "",
            succeeded=False,
            error=error,
            retryable=False,
        ),
    )
