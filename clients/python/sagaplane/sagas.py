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
from functools import cached_property
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from sagaplane import structs
from sagaplane.durations import to_duration
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


class _View:
    """A read-only view of one protobuf message; fields are converted when first read
    (a caller that only wants ``saga.id`` pays for nothing else)."""

    __slots__ = ("__dict__", "proto")

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        """The protobuf message, as the coordinator sent it."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _View) and type(other) is type(self) and other.proto == self.proto

    def __hash__(self) -> int:
        return hash(self.proto.SerializeToString(deterministic=True))


class Step(_View):
    """One step of a saga, as the coordinator last recorded it."""

    proto: saga_pb2.Step

    @classmethod
    def from_proto(cls, step: saga_pb2.Step) -> Step:
        """The view of a wire step."""
        return cls(step)

    @property
    def id(self) -> str:
        """Stable across attempts."""
        return self.proto.id

    @property
    def name(self) -> str:
        """Unique within the saga."""
        return self.proto.name

    @property
    def action(self) -> str:
        """The action that executes the step."""
        return self.proto.action

    @property
    def compensation(self) -> str | None:
        """The action that undoes it; None when the step has nothing to undo."""
        return self.proto.compensation or None

    @property
    def status(self) -> StepStatus:
        """Where the step is in its lifecycle."""
        return StepStatus.from_proto(self.proto.status)

    @cached_property
    def input(self) -> dict[str, Any]:
        """The JSON object handed to the action."""
        return structs.to_dict(self.proto.input)

    @cached_property
    def output(self) -> dict[str, Any] | None:
        """What the action returned (None until it succeeded)."""
        return structs.to_dict(self.proto.output) if self.proto.HasField("output") else None

    @property
    def error(self) -> str:
        """The last failure, empty if none."""
        return self.proto.error

    @property
    def attempts(self) -> int:
        """Attempts of the action so far."""
        return self.proto.attempts

    @property
    def compensation_attempts(self) -> int:
        """Attempts of the compensation so far."""
        return self.proto.compensation_attempts

    @property
    def executed_at(self) -> datetime | None:
        """When the action succeeded."""
        return _time(self.proto, "executed_at")

    @property
    def compensated_at(self) -> datetime | None:
        """When the compensation succeeded."""
        return _time(self.proto, "compensated_at")

    @cached_property
    def retry_policy(self) -> RetryPolicy | None:
        """How the action is retried."""
        return _policy(self.proto, "retry_policy")

    @cached_property
    def compensation_retry_policy(self) -> RetryPolicy | None:
        """How the compensation is retried."""
        return _policy(self.proto, "compensation_retry_policy")

    @property
    def timeout(self) -> timedelta | None:
        """Each attempt's time limit, or None."""
        return _duration(self.proto, "timeout")

    @property
    def deadline_at(self) -> datetime | None:
        """When the attempt in flight times out."""
        return _time(self.proto, "deadline_at")

    @property
    def outcome_unknown(self) -> bool:
        """The action may have happened although the step failed (e.g. it timed out)."""
        return self.proto.outcome_unknown

    @property
    def delivery_problem(self) -> str | None:
        """Why its command in flight has reached no participant (no queue is bound to
        the action); None when nothing is known to be wrong."""
        return self.proto.delivery_problem or None

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Names of the steps it waits for (empty: none)."""
        return tuple(self.proto.depends_on)

    @property
    def when(self) -> str | None:
        """The condition it runs under; None: always."""
        return self.proto.when or None

    def __repr__(self) -> str:
        return f"Step(name={self.name!r}, action={self.action!r}, status={self.status.value!r})"


class HistoryEntry(_View):
    """One transition of a saga: what happened, to which step, and the state it left."""

    proto: saga_pb2.HistoryEntry

    @classmethod
    def from_proto(cls, entry: saga_pb2.HistoryEntry) -> HistoryEntry:
        """The view of a wire history entry."""
        return cls(entry)

    @property
    def from_state(self) -> SagaState:
        """The saga's state before."""
        return SagaState.from_proto(self.proto.from_state)

    @property
    def to_state(self) -> SagaState:
        """The saga's state after."""
        return SagaState.from_proto(self.proto.to_state)

    @property
    def step_name(self) -> str:
        """Empty for a transition of the whole saga (started, compensate requested, ...)."""
        return self.proto.step_name

    @property
    def event(self) -> str:
        """What happened, e.g. ``step_completed``."""
        return self.proto.event

    @property
    def reason(self) -> str:
        """Why, when someone or something said so."""
        return self.proto.reason

    @property
    def caller(self) -> str:
        """Who caused it (the name of the token or client certificate of the call);
        empty when access control is off, and for what replies and timers caused."""
        return self.proto.caller

    @property
    def at(self) -> datetime | None:
        """When (the database's clock)."""
        return _time(self.proto, "at")

    @property
    def position(self) -> int:
        """Larger for every later entry of the saga: where :meth:`SagaClient.watch`
        resumes from (``after_position``)."""
        return self.proto.position

    def __repr__(self) -> str:
        return f"HistoryEntry(event={self.event!r}, step_name={self.step_name!r})"


class Saga(_View):
    """A saga as the coordinator answered it."""

    proto: saga_pb2.Saga

    @classmethod
    def from_proto(cls, saga: saga_pb2.Saga) -> Saga:
        """The view of a wire saga."""
        return cls(saga)

    @property
    def id(self) -> str:
        """The saga's id (a ULID)."""
        return self.proto.id

    @property
    def name(self) -> str:
        """The saga's type name."""
        return self.proto.name

    @property
    def state(self) -> SagaState:
        """Where the saga is in its lifecycle."""
        return SagaState.from_proto(self.proto.state)

    @property
    def ended(self) -> bool:
        """Whether the saga is in :data:`TERMINAL_STATES`."""
        return self.state in TERMINAL_STATES

    @cached_property
    def steps(self) -> tuple[Step, ...]:
        """Its steps, in order."""
        return tuple(Step(s) for s in self.proto.steps)

    @cached_property
    def context(self) -> dict[str, Any]:
        """The JSON object given at start, handed to every step."""
        return structs.to_dict(self.proto.context)

    @property
    def created_at(self) -> datetime | None:
        """When it started."""
        return _time(self.proto, "created_at")

    @property
    def updated_at(self) -> datetime | None:
        """Its last transition."""
        return _time(self.proto, "updated_at")

    @property
    def completed_at(self) -> datetime | None:
        """When it reached a final state."""
        return _time(self.proto, "completed_at")

    @property
    def deadline_at(self) -> datetime | None:
        """When it is compensated if not ended by then."""
        return _time(self.proto, "deadline_at")

    @property
    def idempotency_key(self) -> str | None:
        """The key it was started with, if any."""
        return self.proto.idempotency_key or None

    @cached_property
    def history(self) -> tuple[HistoryEntry, ...]:
        """Its transitions; empty unless asked for (``include_history``)."""
        return tuple(HistoryEntry(e) for e in self.proto.history)

    @property
    def completed(self) -> bool:
        """Whether every step is done (the saga is ``completed``)."""
        return self.state is SagaState.COMPLETED

    @property
    def failed_step(self) -> Step | None:
        """The step whose failure stopped the saga (a forward step ``failed`` for good,
        or a compensation that failed), or None. With steps that ran side by side, the
        first in the saga's order."""
        for status in (StepStatus.COMPENSATION_FAILED, StepStatus.FAILED):
            for step in self.steps:
                if step.status is status:
                    return step
        return None

    def step(self, name: str) -> Step:
        """The step called ``name``; KeyError if there is none."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def __repr__(self) -> str:
        return f"Saga(id={self.id!r}, name={self.name!r}, state={self.state.value!r})"


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _policy(message: Any, field: str) -> RetryPolicy | None:
    return RetryPolicy.from_proto(getattr(message, field)) if message.HasField(field) else None


def _duration(message: Any, field: str) -> timedelta | None:
    if not message.HasField(field):
        return None
    value: duration_pb2.Duration = getattr(message, field)
    return value.ToTimedelta()
