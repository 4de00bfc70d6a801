"""Events the engine reacts to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.engine.model import CommandKind, JsonObject


@dataclass(frozen=True, kw_only=True)
class StepReplied:
    """A participant answered a step command."""

    step_id: str
    kind: CommandKind
    attempt: int
    """Must be the attempt in flight, or the reply is stale."""
    token: str
    """Must echo the command in flight's token, or the reply is ignored."""
    succeeded: bool
    output: JsonObject | None = None
    """The action's result, on success."""
    error: str | None = None
    """Why it failed, on failure."""
    retryable: bool = True
    """On failure: whether another attempt may succeed (the participant says)."""
    output_size: int = 0
    """On success: the output's size on the wire, in bytes. Past
    :data:`~sagaplane.limits.MAX_OUTPUT_BYTES` the output is not decoded (``output`` is
    None) and the engine refuses it."""
    signer: str | None = None
    """The service whose key signed the reply (sagaplane.signing); it must own the step's
    action, or the reply is refused. None: signing is off."""


@dataclass(frozen=True, kw_only=True)
class CompensateRequested:
    """A client asked to undo the saga."""

    reason: str = ""
    undelivered: Mapping[str, str] = field(default_factory=dict)
    """Steps (by id) whose command in flight provably reached no queue, with why: the
    store's proof (:mod:`sagaplane.delivery`); such a step is recorded as not run."""


@dataclass(frozen=True, kw_only=True)
class TimerFired:
    """A step's ``deadline_at`` passed: its attempt timed out, or its retry is due."""

    step_id: str
    undelivered: str | None = None
    """Why the timed-out attempt's command provably reached no queue (the store's proof,
    :mod:`sagaplane.delivery`); None when it may have been delivered."""


@dataclass(frozen=True, kw_only=True)
class SagaDeadlinePassed:
    """The saga's own deadline passed."""

    undelivered: Mapping[str, str] = field(default_factory=dict)
    """As :attr:`CompensateRequested.undelivered`."""


class Resolution(StrEnum):
    """What an operator decided for a saga whose compensation failed."""

    RETRY = "retry"
    """Run the failed compensation once more, now."""
    MARK_COMPENSATED = "mark_compensated"
    """A person undid the step by hand; carry on with the older steps."""


@dataclass(frozen=True, kw_only=True)
class CompensationResolved:
    """An operator resolved a compensation_failed saga."""

    resolution: Resolution
    reason: str


Event = StepReplied | CompensateRequested | TimerFired | SagaDeadlinePassed | CompensationResolved
"""Everything that can happen to a saga after it started."""
