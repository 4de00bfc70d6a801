"""Shared builders for the pure saga engine tests (no I/O)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from coordinator.engine import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRY,
    DEFAULT_STEP_TIMEOUT,
    Command,
    CommandKind,
    Event,
    RetryPolicy,
    Saga,
    Step,
    StepReplied,
    StepSpec,
    TimerFired,
    Transition,
    apply,
    start,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: int) -> datetime:
    """A deterministic instant ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


class Tokens:
    """A deterministic token factory that remembers what it handed out."""

    def __init__(self, prefix: str = "tok") -> None:
        self._counter = itertools.count(1)
        self.prefix = prefix
        self.issued: list[str] = []

    def __call__(self) -> str:
        token = f"{self.prefix}-{next(self._counter)}"
        self.issued.append(token)
        return token


def spec(i: int, *, compensable: bool = True) -> StepSpec:
    return StepSpec(
        name=f"s{i}",
        action=f"svc{i}.do",
        compensation=f"svc{i}.undo" if compensable else None,
        input={"n": i},
    )


def specs(*compensable: bool) -> list[StepSpec]:
    """One spec per flag; the flag says whether the step has a compensation."""
    return [spec(i, compensable=c) for i, c in enumerate(compensable)]


def policy(
    max_attempts: int = 3,
    *,
    initial: float = 1.0,
    coefficient: float = 2.0,
    maximum: float = 60.0,
) -> RetryPolicy:
    """A retry policy with intervals in seconds."""
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_interval=timedelta(seconds=initial),
        backoff_coefficient=coefficient,
        max_interval=timedelta(seconds=maximum),
    )


def fspec(
    i: int,
    *,
    compensable: bool = True,
    retry: RetryPolicy = DEFAULT_RETRY,
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    timeout: timedelta = DEFAULT_STEP_TIMEOUT,
) -> StepSpec:
    """``spec(i)`` with explicit retry policies and timeout."""
    return StepSpec(
        name=f"s{i}",
        action=f"svc{i}.do",
        compensation=f"svc{i}.undo" if compensable else None,
        input={"n": i},
        retry=retry,
        compensation_retry=compensation_retry,
        timeout=timeout,
    )


def start_saga(
    step_specs: Sequence[StepSpec],
    *,
    tokens: Tokens | None = None,
    now: datetime = T0,
    context: dict[str, object] | None = None,
    idempotency_key: str | None = None,
    timeout: timedelta | None = None,
) -> Transition:
    return start(
        saga_id="saga-1",
        name="order.place",
        steps=step_specs,
        step_ids=[f"id-{i}" for i in range(len(step_specs))],
        context={"customer": "c1"} if context is None else context,
        idempotency_key=idempotency_key,
        now=now,
        new_token=tokens or Tokens(),
        timeout=timeout,
    )


def reply_to(
    cmd: Command,
    *,
    ok: bool = True,
    output: dict[str, object] | None = None,
    error: str | None = None,
    token: str | None = None,
    attempt: int | None = None,
    kind: CommandKind | None = None,
    step_id: str | None = None,
    retryable: bool = False,
) -> StepReplied:
    """A reply echoing ``cmd``, with any field overridable to forge stale replies.

    A failure is non-retryable unless asked: final, as if its retries were exhausted.
    """
    return StepReplied(
        step_id=cmd.step_id if step_id is None else step_id,
        kind=cmd.kind if kind is None else kind,
        attempt=cmd.attempt if attempt is None else attempt,
        token=cmd.token if token is None else token,
        succeeded=ok,
        output=output if ok else None,
        error=None if ok else (error or f"{cmd.step_name} broke"),
        retryable=retryable,
    )


class Driver:
    """Keeps a saga and the commands in flight while feeding events to the engine.

    Its clock starts at T0 and moves one second per event unless an event is applied
    at an explicit ``now`` (timers need to be fired at or before a deadline).
    """

    def __init__(self, step_specs: Sequence[StepSpec], **kwargs: object) -> None:
        self.tokens = Tokens()
        self.now: datetime = kwargs.get("now", T0)  # type: ignore[assignment]
        t = start_saga(step_specs, tokens=self.tokens, **kwargs)  # type: ignore[arg-type]
        self.saga: Saga = t.saga
        self.transitions: list[Transition] = [t]
        self.commands: list[Command] = list(t.commands)

    @property
    def last(self) -> Transition:
        return self.transitions[-1]

    @property
    def in_flight(self) -> Command:
        """The command whose reply the saga awaits (the one holding a step's token)."""
        tokens = {s.token for s in self.saga.steps if s.token is not None}
        assert len(tokens) == 1, f"expected one command in flight, saga holds {tokens}"
        (token,) = tokens
        return next(c for c in self.commands if c.token == token)

    def step(self, i: int) -> Step:
        return self.saga.steps[i]

    def apply(self, event: Event, *, now: datetime | None = None) -> Transition:
        self.now = self.now + timedelta(seconds=1) if now is None else now
        t = apply(self.saga, event, now=self.now, new_token=self.tokens)
        self.saga = t.saga
        self.transitions.append(t)
        self.commands.extend(t.commands)
        return t

    def fire(self, i: int, *, late: timedelta = timedelta(0)) -> Transition:
        """TimerFired for step ``i``, applied ``late`` after its deadline."""
        deadline = self.saga.steps[i].deadline_at
        assert deadline is not None, f"step {i} has no deadline"
        return self.apply(TimerFired(step_id=self.saga.steps[i].id), now=deadline + late)

    def fire_early(self, i: int) -> Transition:
        """TimerFired for step ``i`` one microsecond before its deadline."""
        deadline = self.saga.steps[i].deadline_at
        assert deadline is not None, f"step {i} has no deadline"
        return self.apply(
            TimerFired(step_id=self.saga.steps[i].id), now=deadline - timedelta(microseconds=1)
        )

    def succeed(self, output: dict[str, object] | None = None) -> Transition:
        return self.apply(reply_to(self.in_flight, output=output))

    def fail(self, error: str | None = None, *, retryable: bool = False) -> Transition:
        return self.apply(reply_to(self.in_flight, ok=False, error=error, retryable=retryable))

    def history(self) -> list[tuple[object, object, str | None, str]]:
        return [
            (h.from_state, h.to_state, h.step_name, h.event)
            for t in self.transitions
            for h in t.history
        ]
