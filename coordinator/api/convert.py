"""Engine records -> protobuf messages; the only place the API builds them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from coordinator.engine import HistoryEntry, RetryPolicy, Saga, SagaState, Step, StepStatus, graph
from sagaplane import structs
from sagaplane.v1 import saga_pb2

_SAGA_STATES = {
    SagaState.STARTED: saga_pb2.SAGA_STATE_STARTED,
    SagaState.COMPLETED: saga_pb2.SAGA_STATE_COMPLETED,
    SagaState.FAILED: saga_pb2.SAGA_STATE_FAILED,
    SagaState.COMPENSATING: saga_pb2.SAGA_STATE_COMPENSATING,
    SagaState.COMPENSATED: saga_pb2.SAGA_STATE_COMPENSATED,
    SagaState.COMPENSATION_FAILED: saga_pb2.SAGA_STATE_COMPENSATION_FAILED,
}
_STEP_STATUSES = {
    StepStatus.PENDING: saga_pb2.STEP_STATUS_PENDING,
    StepStatus.STARTED: saga_pb2.STEP_STATUS_STARTED,
    StepStatus.COMPLETED: saga_pb2.STEP_STATUS_COMPLETED,
    StepStatus.FAILED: saga_pb2.STEP_STATUS_FAILED,
    StepStatus.COMPENSATING: saga_pb2.STEP_STATUS_COMPENSATING,
    StepStatus.COMPENSATED: saga_pb2.STEP_STATUS_COMPENSATED,
    StepStatus.COMPENSATION_FAILED: saga_pb2.STEP_STATUS_COMPENSATION_FAILED,
    StepStatus.SKIPPED: saga_pb2.STEP_STATUS_SKIPPED,
    StepStatus.RETRYING: saga_pb2.STEP_STATUS_RETRYING,
    StepStatus.COMPENSATION_RETRYING: saga_pb2.STEP_STATUS_COMPENSATION_RETRYING,
}


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _policy(policy: RetryPolicy) -> saga_pb2.RetryPolicy:
    return saga_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_interval=_duration(policy.initial_interval),
        backoff_coefficient=policy.backoff_coefficient,
        max_interval=_duration(policy.max_interval),
    )


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def step_to_proto(step: Step, steps: Sequence[Step]) -> saga_pb2.Step:
    """The API view of a step of ``steps`` (its command token stays secret)."""
    return saga_pb2.Step(
        id=step.id,
        name=step.name,
        action=step.action,
        compensation=step.compensation or "",
        input=structs.to_struct(step.input),
        output=structs.to_struct(step.output) if step.output is not None else None,
        status=_STEP_STATUSES[step.status],
        error=step.error or "",
        attempts=step.attempts,
        executed_at=_timestamp(step.executed_at),
        compensation_attempts=step.compensation_attempts,
        compensated_at=_timestamp(step.compensated_at),
        retry_policy=_policy(step.retry),
        compensation_retry_policy=_policy(step.compensation_retry),
        timeout=_duration(step.timeout),
        deadline_at=_timestamp(step.deadline_at),
        outcome_unknown=step.outcome_unknown,
        depends_on=[steps[d].name for d in graph.dependencies(steps, step.position)],
        when=step.when or "",
        delivery_problem=step.delivery_problem or "",
    )


def history_to_proto(entry: HistoryEntry) -> saga_pb2.HistoryEntry:
    """The API view of one history entry."""
    return saga_pb2.HistoryEntry(
        from_state=_SAGA_STATES[entry.from_state]
        if entry.from_state
        else saga_pb2.SAGA_STATE_UNSPECIFIED,
        to_state=_SAGA_STATES[entry.to_state],
        step_name=entry.step_name or "",
        event=entry.event,
        reason=entry.reason or "",
        at=_timestamp(entry.at),
        position=entry.position,
        caller=entry.caller or "",
    )


def saga_to_proto(saga: Saga, history: Sequence[HistoryEntry] = ()) -> saga_pb2.Saga:
    """The API view of a saga."""
    return saga_pb2.Saga(
        id=saga.id,
        name=saga.name,
        state=_SAGA_STATES[saga.state],
        steps=[step_to_proto(s, saga.steps) for s in saga.steps],
        context=structs.to_struct(saga.context),
        created_at=_timestamp(saga.created_at),
        updated_at=_timestamp(saga.updated_at),
        completed_at=_timestamp(saga.completed_at),
        idempotency_key=saga.idempotency_key or "",
        history=[history_to_proto(h) for h in history],
        deadline_at=_timestamp(saga.deadline_at),
    )
