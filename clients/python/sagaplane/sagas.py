"""Sagas as :class:`~sagaplane.client.SagaClient` returns them: plain Python, protobuf kept.

A :class:`Saga` has state names (``saga.state == "completed"``), dicts for JSON,
``datetime`` for timestamps and ``timedelta`` for durations; ``saga.proto`` is the
``sagaplane.v1.saga_pb2.Saga`` it was read from, for what every other language sees.
The enums are :class:`~enum.StrEnum`: a state compares equal to its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from sagaplane import structs
from sagaplane.v1 import saga_pb2

__all__ = [
    "TERMINAL_STATES",
    "HistoryEntry",
    "RetryPolicy",
    "Saga",
    "SagaState",
    "Step",
    "StepStatus",
]


class SagaState(StrEnum):
    """A saga's state (``SAGA_STATE_<NAME>`` on the wire, lower case here)."""

    UNSPECIFIED = "unspecified"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"

    @classmethod
    def from_proto(cls, value: int) -> SagaState:
        """The state of a ``saga_pb2.SagaState`` value (UNSPECIFIED for one this SDK
        does not know, e.g. from a newer coordinator)."""
        return _SAGA_STATES.get(value, cls.UNSPECIFIED)

    def to_proto(self) -> saga_pb2.SagaState.ValueType:
        """The wire value."""
        return saga_pb2.SagaState.Value(f"SAGA_STATE_{self.name}")


class StepStatus(StrEnum):
    """A step's status (``STEP_STATUS_<NAME>`` on the wire, lower case here)."""

    UNSPECIFIED = "unspecified"
    PENDING = "pending"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"
    RETRYING = "retrying"
    COMPENSATION_RETRYING = "compensation_retrying"

    @classmethod
    def from_proto(cls, value: int) -> StepStatus:
        """The status of a ``saga_pb2.StepStatus`` value (UNSPECIFIED when unknown)."""
        return _STEP_STATUSES.get(value, cls.UNSPECIFIED)


_SAGA_STATES: dict[int, SagaState] = {
    saga_pb2.SagaState.Value(f"SAGA_STATE_{s.name}"): s for s in SagaState
}
_STEP_STATUSES: dict[int, StepStatus] = {
    saga_pb2.StepStatus.Value(f"STEP_STATUS_{s.name}"): s for s in StepStatus
}

TERMINAL_STATES: frozenset[SagaState] = frozenset(
    {
        SagaState.COMPLETED,
        SagaState.FAILED,
        SagaState.COMPENSATED,
        # Not finished, but nothing more happens without a person: waiting longer is pointless.
        SagaState.COMPENSATION_FAILED,
    }
)
"""The states :meth:`~sagaplane.client.SagaClient.wait` returns on."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often a step's action (or its compensation) is tried, and how long between.

    A field left at None (0 for ``max_attempts``) takes the coordinator's default, or
    the saga's policy when this one is a step's. Intervals are seconds or timedeltas.
    """

    max_attempts: int = 0
    """Attempts in all, the first included (1: never retried)."""
    initial_interval: float | timedelta | None = None
    """The wait before the first retry."""
    backoff_coefficient: float = 0.0
    """Each wait is the previous one times this (at least 1)."""
    max_interval: float | timedelta | None = None
    """No wait is longer than this."""

    def to_proto(self) -> saga_pb2.RetryPolicy:
        """The wire form."""
        policy = saga_pb2.RetryPolicy(
            max_attempts=self.max_attempts, backoff_coefficient=self.backoff_coefficient
        )
        if self.initial_interval is not None:
            policy.initial_interval.CopyFrom(to_duration(self.initial_interval))
        if self.max_interval is not None:
            policy.max_interval.CopyFrom(to_duration(self.max_interval))
        return policy

    @classmethod
    def from_proto(cls, policy: saga_pb2.RetryPolicy) -> RetryPolicy:
        """The policy a step was stored with."""
        return cls(
            max_attempts=policy.max_attempts,
            initial_interval=_duration(policy, "initial_interval"),
            backoff_coefficient=policy.backoff_coefficient,
            max_interval=_duration(policy, "max_interval"),
        )


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a saga, as the coordinator last recorded it."""

    id: str
    name: str
    action: str
    compensation: str | None
    """None when the step has nothing to undo."""
    status: StepStatus
    input: dict[str, Any]
    output: dict[str, Any] | None
    """What the action returned (None until it succeeded)."""
    error: str
    """The last failure, empty if none."""
    attempts: int
    compensation_attempts: int
    executed_at: datetime | None
    compensated_at: datetime | None
    retry_policy: RetryPolicy | None
    compensation_retry_policy: RetryPolicy | None
    timeout: timedelta | None
    """Each attempt's time limit, or None."""
    deadline_at: datetime | None
    """When the attempt in flight times out."""
    outcome_unknown: bool
    """The action may have happened although the step failed (e.g. it timed out)."""
    proto: saga_pb2.Step

    @classmethod
    def from_proto(cls, step: saga_pb2.Step) -> Step:
        """The view of a wire step."""
        return cls(
            id=step.id,
            name=step.name,
            action=step.action,
            compensation=step.compensation or None,
            status=StepStatus.from_proto(step.status),
            input=structs.to_dict(step.input),
            output=structs.to_dict(step.output) if step.HasField("output") else None,
            error=step.error,
            attempts=step.attempts,
            compensation_attempts=step.compensation_attempts,
            executed_at=_time(step, "executed_at"),
            compensated_at=_time(step, "compensated_at"),
            retry_policy=(
                RetryPolicy.from_proto(step.retry_policy) if step.HasField("retry_policy") else None
            ),
            compensation_retry_policy=(
                RetryPolicy.from_proto(step.compensation_retry_policy)
                if step.HasField("compensation_retry_policy")
                else None
            ),
            timeout=_duration(step, "timeout"),
            deadline_at=_time(step, "deadline_at"),
            outcome_unknown=step.outcome_unknown,
            proto=step,
        )


@dataclass(frozen=True, kw_only=True)
class HistoryEntry:
    """One transition of a saga: what happened, to which step, and the state it left."""

    from_state: SagaState
    to_state: SagaState
    step_name: str
    """Empty for a transition of the whole saga (started, compensate requested, ...)."""
    event: str
    reason: str
    at: datetime | None
    proto: saga_pb2.HistoryEntry

    @classmethod
    def from_proto(cls, entry: saga_pb2.HistoryEntry) -> HistoryEntry:
        """The view of a wire history entry."""
        return cls(
            from_state=SagaState.from_proto(entry.from_state),
            to_state=SagaState.from_proto(entry.to_state),
            step_name=entry.step_name,
            event=entry.event,
            reason=entry.reason,
            at=_time(entry, "at"),
            proto=entry,
        )


@dataclass(frozen=True, kw_only=True)
class Saga:
    """A saga as the coordinator answered it."""

    id: str
    name: str
    state: SagaState
    steps: tuple[Step, ...]
    context: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    completed_at: datetime | None
    deadline_at: datetime | None
    idempotency_key: str | None
    history: tuple[HistoryEntry, ...]
    """Empty unless asked for (``include_history``)."""
    proto: saga_pb2.Saga

    @property
    def ended(self) -> bool:
        """Whether the saga is in :data:`TERMINAL_STATES`."""
        return self.state in TERMINAL_STATES

    def step(self, name: str) -> Step:
        """The step called ``name``; KeyError if there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @classmethod
    def from_proto(cls, saga: saga_pb2.Saga) -> Saga:
        """The view of a wire saga."""
        return cls(
            id=saga.id,
            name=saga.name,
            state=SagaState.from_proto(saga.state),
            steps=tuple(Step.from_proto(s) for s in saga.steps),
            context=structs.to_dict(saga.context),
            created_at=_time(saga, "created_at"),
            updated_at=_time(saga, "updated_at"),
            completed_at=_time(saga, "completed_at"),
            deadline_at=_time(saga, "deadline_at"),
            idempotency_key=saga.idempotency_key or None,
            history=tuple(HistoryEntry.from_proto(e) for e in saga.history),
            proto=saga,
        )


def to_duration(value: float | timedelta) -> duration_pb2.Duration:
    """A protobuf Duration of seconds or a timedelta (ValueError if negative)."""
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta < timedelta(0):
        raise ValueError(f"a duration must not be negative, not {delta}")
    duration = duration_pb2.Duration()
    duration.FromTimedelta(delta)
    return duration


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _duration(message: Any, field: str) -> timedelta | None:
    if not message.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(message, field)
    return value.ToTimedelta()
