"""Engine records -> protobuf messages; the only place the API builds them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from coordinator.engine import (
    HistoryEntry,
    JsonObject,
    RetryPolicy,
    Saga,
    SagaState,
    Step,
    StepStatus,
    graph,
)
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


# Steps carry the same few retry policies and timeouts over and over: converting them
# once (protobuf's Python helpers are slow) took step_to_proto from 21 to ~11 us. The
# cached messages are only ever copied into the messages built here, never changed.
@functools.lru_cache(maxsize=1024)
def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


@functools.lru_cache(maxsize=1024)
def _policy(policy: RetryPolicy) -> saga_pb2.RetryPolicy:
    return saga_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_interval=_duration(policy.initial_interval),
        backoff_coefficient=policy.backoff_coefficient,
        max_interval=_duration(policy.max_interval),
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Timestamp.FromDatetime's arithmetic, without its Python-level checks and calls (a
    # third of a step's conversion). A naive datetime is UTC, as FromDatetime takes it;
    # a negative delta still has seconds and microseconds >= 0, as nanos must be.
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


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
    steps = [step_to_proto(s, saga.steps) for s in saga.steps]
    return _saga(saga, steps, structs.to_struct(saga.context), history)


class SagaViews:
    """Successive API views of one saga (WatchSaga's messages), changing in the previous
    view only what changed: a saga's context never changes, and a transition changes a
    step or two. Converting the whole saga again for every message was most of what a
    watcher cost beyond gRPC itself (``python -m bench --phases watchers``)."""

    def __init__(self) -> None:
        self._wire: saga_pb2.Saga | None = None
        self._context: JsonObject | None = None
        self._steps: list[Step] = []

    def view(self, saga: Saga) -> saga_pb2.Saga:
        """The API view of ``saga`` (without history), as :func:`saga_to_proto` gives.

        It is this object's own message, changed in place by the next call: copy it (as
        putting it in another message does) to keep it."""
        wire = self._wire
        if (
            wire is None
            or wire.id != saga.id
            or len(self._steps) != len(saga.steps)
            or not _same(saga.context, self._context)
        ):
            self._wire = saga_to_proto(saga)
            self._context, self._steps = saga.context, list(saga.steps)
            return self._wire
        for i, step in enumerate(saga.steps):
            if not _same(step, self._steps[i]):
                wire.steps[i].CopyFrom(step_to_proto(step, saga.steps))
                self._steps[i] = step
        wire.state = _SAGA_STATES[saga.state]
        for name in ("updated_at", "completed_at", "deadline_at"):
            value = _timestamp(getattr(saga, name))
            if value is None:
                wire.ClearField(name)
            else:
                getattr(wire, name).CopyFrom(value)
        return wire


def _same(a: object, b: object) -> bool:
    # Records handed over in memory are often the very same objects.
    return a is b or a == b


def _saga(
    saga: Saga,
    steps: Sequence[saga_pb2.Step],
    context: struct_pb2.Struct,
    history: Sequence[HistoryEntry] = (),
) -> saga_pb2.Saga:
    return saga_pb2.Saga(
        id=saga.id,
        name=saga.name,
        state=_SAGA_STATES[saga.state],
        steps=steps,
        context=context,
        created_at=_timestamp(saga.created_at),
        updated_at=_timestamp(saga.updated_at),
        completed_at=_timestamp(saga.completed_at),
        idempotency_key=saga.idempotency_key or "",
        history=[history_to_proto(h) for h in history],
        deadline_at=_timestamp(saga.deadline_at),
    )
