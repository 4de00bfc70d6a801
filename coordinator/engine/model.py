"""The saga records the engine works on: plain frozen dataclasses, no I/O, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

JsonObject = dict[str, Any]
"""A JSON object (context, step input, step output)."""


class SagaState(StrEnum):
    """Where a saga is in its lifecycle (see ``proto/sagaplane/v1/saga.proto``)."""

    STARTED = "started"
    """Steps run forward, each once the steps it depends on are done."""
    COMPLETED = "completed"
    """Every step completed. Compensate can still undo it."""
    FAILED = "failed"
    """A forward step failed and no completed step had anything to undo."""
    COMPENSATING = "compensating"
    """Compensations of completed steps run, dependents before what they depend on."""
    COMPENSATED = "compensated"
    """Every completed step with a compensation was compensated."""
    COMPENSATION_FAILED = "compensation_failed"
    """A compensation failed; the saga waits for a person."""


ACTIVE_STATES = frozenset(
    {SagaState.STARTED, SagaState.COMPENSATING, SagaState.COMPENSATION_FAILED}
)
"""States listed by ListActive: the saga still needs something to happen. The database
says the same in ``sagaplane_saga_is_active`` (``store/sql/0004_active_states.sql``)."""

FINAL_STATES = frozenset({SagaState.FAILED, SagaState.COMPENSATED})
"""States from which nothing can ever happen again."""


class StepStatus(StrEnum):
    """Where a step is in its lifecycle."""

    PENDING = "pending"
    STARTED = "started"
    """Its command is in flight."""
    RETRYING = "retrying"
    """An attempt failed (or timed out); the next one is due at ``deadline_at``."""
    COMPLETED = "completed"
    FAILED = "failed"
    COMPENSATING = "compensating"
    """Its compensation command is in flight."""
    COMPENSATION_RETRYING = "compensation_retrying"
    """A compensation attempt failed; the next one is due at ``deadline_at``."""
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    SKIPPED = "skipped"


IN_FLIGHT = frozenset({StepStatus.STARTED, StepStatus.COMPENSATING})
"""Statuses in which a command was sent and its reply is awaited."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often, and how far apart, attempts are made.

    The wait before attempt n+1 is drawn uniformly from [0, min(max_interval,
    initial_interval * backoff_coefficient ** (n - 1))] ("full jitter"), so that
    many steps failing together do not retry together.
    """

    max_attempts: int = 3
    """Attempts in all, the first one included; 1 means no retry."""
    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    max_interval: timedelta = timedelta(seconds=60)


DEFAULT_RETRY = RetryPolicy()
"""For step actions: 3 attempts, 1 s, doubling, at most 60 s apart. Changing a default
changes only sagas started afterwards: each step stores the policies it started with."""
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=10)
"""For compensations, which must finish: 10 attempts (about 8 minutes with jitter's upper bound)."""
DEFAULT_STEP_TIMEOUT = timedelta(seconds=30)
"""How long an attempt may go without a reply before it counts as failed."""


class CommandKind(StrEnum):
    """Whether a command runs a step's action or its compensation."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a saga."""

    id: str
    """Unique id (ULID)."""
    position: int
    """0-based place in the saga (steps run in this order unless ``depends_on`` says
    otherwise)."""
    name: str
    """Unique within the saga."""
    action: str
    """Routing key of the step's command."""
    compensation: str | None
    """Routing key of the undo command; None when there is nothing to undo."""
    input: JsonObject
    """Handed to the action."""
    output: JsonObject | None = None
    """What the action returned; handed to the compensation."""
    status: StepStatus = StepStatus.PENDING
    """Lifecycle state."""
    error: str | None = None
    """Last error reported by the action or the compensation."""
    attempts: int = 0
    """How many times the action was dispatched."""
    compensation_attempts: int = 0
    """How many times the compensation was dispatched."""
    token: str | None = None
    """Secret of the command in flight; its reply must echo it."""
    executed_at: datetime | None = None
    """When the action's outcome was recorded."""
    compensated_at: datetime | None = None
    """When the compensation's success was recorded."""
    retry: RetryPolicy = DEFAULT_RETRY
    """Retries of the action."""
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    """Retries of the compensation."""
    timeout: timedelta = DEFAULT_STEP_TIMEOUT
    """How long one attempt (action or compensation) may take."""
    deadline_at: datetime | None = None
    """When the coordinator acts on its own: the attempt in flight times out, or the
    next attempt is due. None when nothing is awaited."""
    outcome_unknown: bool = False
    """An attempt of the action timed out and no later attempt succeeded: the action
    may have taken effect without a reply, so a compensation must undo it even though
    the step is not completed."""
    depends_on: tuple[int, ...] | None = None
    """Positions of the steps this one waits for; None: the step before it (none for the
    first), which makes a saga of such steps run one after another."""
    when: str | None = None
    """A CEL condition (:mod:`coordinator.engine.conditions`): false skips the step."""
    delivery_problem: str | None = None
    """Why the command in flight has not reached a participant (no queue is bound to
    its action). Read by the store for clients from what the outbox relay recorded; not
    stored with the step, and never set on a saga the engine is given."""


@dataclass(frozen=True, kw_only=True)
class Saga:
    """A saga and its steps."""

    id: str
    """Unique, time-ordered id (ULID)."""
    name: str
    """The saga's type name."""
    state: SagaState
    """Lifecycle state."""
    context: JsonObject
    """Shared with every command."""
    steps: tuple[Step, ...]
    """In the order given at start (``Step.position``)."""
    created_at: datetime
    """When it was started."""
    updated_at: datetime
    """When it last changed."""
    completed_at: datetime | None = None
    """When it reached COMPLETED, FAILED or COMPENSATED."""
    idempotency_key: str | None = None
    """Given by the client to make StartSaga safe to repeat."""
    deadline_at: datetime | None = None
    """A saga still started at this time is compensated. None: no deadline."""

    def step_by_id(self, step_id: str) -> Step | None:
        """The step with this id, if any."""
        return next((s for s in self.steps if s.id == step_id), None)


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """A step as asked for by StartSaga."""

    name: str
    action: str
    compensation: str | None
    input: JsonObject = field(default_factory=dict)
    retry: RetryPolicy = DEFAULT_RETRY
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    timeout: timedelta = DEFAULT_STEP_TIMEOUT
    depends_on: tuple[str, ...] | None = None
    """Names of the steps this one waits for; None: the step before it; (): none."""
    when: str | None = None
    """A CEL condition evaluated when the step is ready; false skips it."""


@dataclass(frozen=True, kw_only=True)
class SagaSpec:
    """A saga as asked for by StartSaga, validated (the API builds it, the store starts it)."""

    name: str
    steps: tuple[StepSpec, ...]
    context: JsonObject
    idempotency_key: str | None = None
    """Makes starting safe to repeat: a second start with this key returns the first saga."""
    timeout: timedelta | None = None
    """The saga's deadline, counted from its start; None for no deadline."""


@dataclass(frozen=True, kw_only=True)
class Command:
    """A step command to send to the participant that handles ``action``."""

    saga_id: str
    saga_name: str
    step_id: str
    step_name: str
    kind: CommandKind
    action: str
    attempt: int
    input: JsonObject
    output: JsonObject | None
    context: JsonObject
    token: str
    results: dict[str, JsonObject] = field(default_factory=dict)
    """The outputs of the completed steps this one depends on (directly or not), by
    step name."""
    deadline_at: datetime | None = None
    """When this attempt times out (the step's ``deadline_at`` at dispatch, on the
    database clock); None: no deadline."""
    timeout: timedelta | None = None
    """How long this attempt may take (the step's timeout); None: no deadline."""


@dataclass(frozen=True, kw_only=True)
class HistoryEntry:
    """One recorded transition; the history is append-only."""

    from_state: SagaState | None
    """None for the saga's first entry."""
    to_state: SagaState
    step_name: str | None
    event: str
    """A short word: saga_started, step_dispatched, step_completed, ..."""
    reason: str | None = None
    at: datetime | None = None
    """Set by the store from the database clock when read back."""
    position: int = 0
    """Set by the store when read back: larger for every later entry of the saga."""
    caller: str | None = None
    """Who caused it (a token's or client certificate's name), for transitions an API
    call caused while access control is on; set by the store, never by the engine."""


@dataclass(frozen=True, kw_only=True)
class Transition:
    """What applying one event to a saga produced."""

    saga: Saga
    """The saga after the event (the same object when the event was ignored)."""
    commands: tuple[Command, ...] = ()
    """Commands to send, in order."""
    history: tuple[HistoryEntry, ...] = ()
    """Entries to append to the history."""
    ignored: str | None = None
    """Why the event changed nothing (a duplicate or stale reply, a repeated request)."""
    refused: bool = False
    """With ``ignored``: the event cannot have come from a command this saga sent (an
    unknown step, a token that does not match the attempt in flight), so it is forged or
    broken rather than late. The reply consumer dead-letters such a reply."""
