"""The saga state machine: (saga, event, now) -> new saga + commands + history.

Pure: no I/O, no clock (``now`` is passed in) and no randomness of its own
(command tokens come from the ``new_token`` callable the caller passes; retry
jitter is a hash of the step, kind and attempt).

Steps run forward as a graph (:mod:`coordinator.engine.graph`): every step whose
dependencies are all completed is dispatched in the same transition, so a step
that says nothing about its dependencies waits for the step before it and a
plain saga runs one step at a time. A failed attempt is retried after a backoff
while its retry policy allows and the participant called the error retryable;
an attempt without a reply by its deadline is a failed, retryable attempt whose
outcome is unknown. A step that finally fails, a Compensate request or the
saga's deadline turns the saga to COMPENSATING: no step is dispatched forward
any more, steps whose command is in flight are waited for (and compensated if
they then succeed), and the compensation of every completed step (and of every
step whose outcome is unknown) runs, each with its own retries, once every step
that depends on it has been undone; independent branches are undone at the same
time, a plain saga newest first, one at a time. A compensation that exhausts
its retries, or fails non-retryably, stops the saga in COMPENSATION_FAILED until
a person resolves it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from coordinator.engine import conditions, graph, references
from coordinator.engine.errors import WrongState
from coordinator.engine.events import (
    CompensateRequested,
    CompensationResolved,
    Event,
    Resolution,
    SagaDeadlinePassed,
    StepReplied,
    TimerFired,
)
from coordinator.engine.model import (
    Command,
    CommandKind,
    HistoryEntry,
    JsonObject,
    RetryPolicy,
    Saga,
    SagaState,
    Step,
    StepSpec,
    StepStatus,
    Transition,
)
from sagaplane import signing
from sagaplane.limits import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_OUTPUT_BYTES,
    MAX_SAGA_INPUT_BYTES,
    MAX_SAGA_OUTPUT_BYTES,
    clean_text,
)

TokenFactory = Callable[[], str]


def start(
    *,
    saga_id: str,
    name: str,
    steps: Sequence[StepSpec],
    step_ids: Sequence[str],
    context: JsonObject,
    idempotency_key: str | None,
    now: datetime,
    new_token: TokenFactory,
    timeout: timedelta | None = None,
) -> Transition:
    """Create a saga and dispatch its first step; ``timeout`` sets its deadline."""
    if not steps:
        raise ValueError("a saga needs at least one step")
    if len(step_ids) != len(steps) or len(set(step_ids)) != len(steps):
        raise ValueError("one unique step id per step")
    if len({spec.name for spec in steps}) != len(steps):
        raise ValueError("step names must be unique")
    depends_on = plan(steps)
    saga = Saga(
        id=saga_id,
        name=name,
        state=SagaState.STARTED,
        context=context,
        steps=tuple(
            Step(
                id=step_id,
                position=i,
                name=spec.name,
                action=spec.action,
                compensation=spec.compensation or None,
                input=spec.input,
                retry=spec.retry,
                compensation_retry=spec.compensation_retry,
                timeout=spec.timeout,
                depends_on=depends_on[i],
                when=spec.when,
            )
            for i, (spec, step_id) in enumerate(zip(steps, step_ids, strict=True))
        ),
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key,
        deadline_at=now + timeout if timeout else None,
    )
    b = _Builder(saga, now, new_token)
    b.record(None, SagaState.STARTED, None, "saga_started")
    b.advance()
    return b.build()


def plan(steps: Sequence[StepSpec]) -> tuple[tuple[int, ...] | None, ...]:
    """Check the steps' dependencies and the references in their inputs; each step's
    dependencies as positions (see :func:`coordinator.engine.graph.resolve`).

    Raises :class:`~coordinator.engine.errors.InvalidSpec` naming the field.
    """
    depends_on = graph.resolve(steps)
    names = {spec.name for spec in steps}
    for i, above in enumerate(graph.ancestors(depends_on)):
        known = {steps[j].name for j in above}
        references.check(f"steps[{i}].input", steps[i].input, known, names)
        when = steps[i].when
        if when is not None:
            conditions.check(f"steps[{i}].when", when, known, names)
    return depends_on


def apply(saga: Saga, event: Event, *, now: datetime, new_token: TokenFactory) -> Transition:
    """Apply ``event`` to ``saga``.

    Raises :class:`WrongState` when the event may not happen in the saga's
    state (Compensate on a compensation_failed saga, resolving a saga whose
    compensation did not fail). An event that merely no longer applies (a
    duplicate or stale reply, a timer already handled) returns a transition with
    ``ignored`` set and nothing changed.
    """
    if isinstance(event, StepReplied):
        return _on_reply(saga, event, now, new_token)
    if isinstance(event, TimerFired):
        return _on_timer(saga, event, now, new_token)
    if isinstance(event, SagaDeadlinePassed):
        return _on_saga_deadline(saga, event, now, new_token)
    if isinstance(event, CompensationResolved):
        return _on_resolved(saga, event, now, new_token)
    return _on_compensate(saga, event, now, new_token)


def backoff(policy: RetryPolicy, step_id: str, kind: CommandKind, attempt: int) -> timedelta:
    """The wait after failed ``attempt`` (1-based): full jitter under an exponential cap."""
    cap = policy.max_interval.total_seconds()
    # Past a float's range the exponential is long above any maximum: keep the maximum.
    with contextlib.suppress(OverflowError):
        cap = min(
            cap,
            policy.initial_interval.total_seconds() * policy.backoff_coefficient ** (attempt - 1),
        )

    digest = hashlib.blake2b(f"{step_id}:{kind}:{attempt}".encode(), digest_size=8).digest()
    return timedelta(seconds=cap * int.from_bytes(digest) / 2**64)


def _on_reply(saga: Saga, ev: StepReplied, now: datetime, new_token: TokenFactory) -> Transition:
    step = saga.step_by_id(ev.step_id)
    if step is None:
        return Transition(saga=saga, ignored="unknown step", refused=True)
    action = step.action if ev.kind is CommandKind.EXECUTE else step.compensation or step.action
    if ev.signer is not None and signing.owner(action) != ev.signer:
        # Checked first: a service may not answer (or replay) another service's step.
        return Transition(
            saga=saga,
            ignored=f"signed by {ev.signer!r}, which does not own action {action!r}",
            refused=True,
        )
    expected_status, attempt = (
        (StepStatus.STARTED, step.attempts)
        if ev.kind is CommandKind.EXECUTE
        else (StepStatus.COMPENSATING, step.compensation_attempts)
    )
    if step.status is not expected_status:
        return Transition(saga=saga, ignored=f"step is {step.status}; no {ev.kind} reply awaited")
    if ev.attempt != attempt:
        return Transition(saga=saga, ignored=f"attempt {ev.attempt} is not {attempt}")
    if ev.token != step.token:
        return Transition(
            saga=saga, ignored="token does not match the command in flight", refused=True
        )

    b = _Builder(saga, now, new_token)
    i = step.position
    if ev.kind is CommandKind.EXECUTE:
        refused = _refused_output(saga, step, ev) if ev.succeeded else None
        if refused is not None:
            # The action took effect, but its output would make the saga unreadable: the
            # step fails, and its effect is undone like that of a step that timed out.
            b.attempt_failed(i, CommandKind.EXECUTE, refused, retryable=False, unknown=True)
        elif ev.succeeded:
            b.set_step(
                i,
                status=StepStatus.COMPLETED,
                output=ev.output or {},
                executed_at=now,
                outcome_unknown=False,
            )
            b.record_step(step, "step_completed")
            if b.saga.state is SagaState.STARTED:
                b.advance()
            else:
                b.continue_compensation()
        else:
            b.attempt_failed(i, CommandKind.EXECUTE, ev.error, ev.retryable, unknown=False)
    elif ev.succeeded:
        b.set_step(i, status=StepStatus.COMPENSATED, compensated_at=now)
        b.record_step(step, "step_compensated")
        b.continue_compensation()
    else:
        b.attempt_failed(i, CommandKind.COMPENSATE, ev.error, ev.retryable, unknown=False)
    return b.build()


def _refused_output(saga: Saga, step: Step, ev: StepReplied) -> str | None:
    """Why a successful reply's output cannot be kept, or None (see sagaplane.limits)."""
    if ev.output_size > MAX_OUTPUT_BYTES:
        return (
            f"OutputTooLarge: the step's output is {ev.output_size} bytes; "
            f"at most {MAX_OUTPUT_BYTES} are kept"
        )
    # Only a saga of many steps can reach the saga's total; the others pay nothing.
    if len(saga.steps) * MAX_OUTPUT_BYTES <= MAX_SAGA_OUTPUT_BYTES:
        return None
    total = json_size(ev.output or {}) + sum(
        json_size(s.output) for s in saga.steps if s.output is not None and s.id != step.id
    )
    if total > MAX_SAGA_OUTPUT_BYTES:
        return (
            f"OutputTooLarge: with this output the saga's outputs would take {total} bytes; "
            f"at most {MAX_SAGA_OUTPUT_BYTES} are kept"
        )
    return None


def json_size(value: JsonObject) -> int:
    """The size of ``value`` as compact UTF-8 JSON, how the saga's output budget counts."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _on_timer(saga: Saga, ev: TimerFired, now: datetime, new_token: TokenFactory) -> Transition:
    step = saga.step_by_id(ev.step_id)
    if step is None or step.deadline_at is None or step.deadline_at > now:
        return Transition(saga=saga, ignored="no deadline of this step has passed")
    b = _Builder(saga, now, new_token)
    i = step.position
    seconds = f"{step.timeout.total_seconds():g}"
    if step.status is StepStatus.STARTED:
        error = f"attempt {step.attempts} timed out after {seconds}s"
        if ev.undelivered is not None:
            # Proven never delivered: the action cannot have run, nothing to undo for it.
            error = f"{error}; {ev.undelivered}"
        b.attempt_failed(
            i,
            CommandKind.EXECUTE,
            error,
            retryable=True,
            unknown=ev.undelivered is None,
            names_attempt=True,
        )
    elif step.status is StepStatus.COMPENSATING:
        error = f"compensation attempt {step.compensation_attempts} timed out after {seconds}s"
        # The action's outcome is known (it completed); only the undo's is in doubt, and
        # compensations are retried until they are known to have succeeded.
        b.attempt_failed(
            i, CommandKind.COMPENSATE, error, retryable=True, unknown=False, names_attempt=True
        )
    elif step.status is StepStatus.RETRYING:
        b.dispatch(i, CommandKind.EXECUTE)
    elif step.status is StepStatus.COMPENSATION_RETRYING:
        b.dispatch(i, CommandKind.COMPENSATE)
    else:
        return Transition(saga=saga, ignored=f"step is {step.status}; no timer is due")
    return b.build()


def _on_saga_deadline(
    saga: Saga, ev: SagaDeadlinePassed, now: datetime, new_token: TokenFactory
) -> Transition:
    if saga.state is not SagaState.STARTED or saga.deadline_at is None or saga.deadline_at > now:
        return Transition(saga=saga, ignored="the saga's deadline does not apply")
    return _begin_compensation(
        saga, now, new_token, "saga_deadline_passed", "deadline passed", ev.undelivered
    )


def _on_compensate(
    saga: Saga, ev: CompensateRequested, now: datetime, new_token: TokenFactory
) -> Transition:
    if saga.state in (SagaState.COMPENSATING, SagaState.COMPENSATED, SagaState.FAILED):
        # Already undone, or being undone: asking again is a no-op, so clients may retry.
        return Transition(saga=saga, ignored=f"saga is already {saga.state}")
    if saga.state is SagaState.COMPENSATION_FAILED:
        raise WrongState(
            "saga is compensation_failed: a compensation failed and needs a person; "
            "use ResolveCompensation"
        )
    return _begin_compensation(
        saga, now, new_token, "compensation_requested", ev.reason or None, ev.undelivered
    )


def _begin_compensation(
    saga: Saga,
    now: datetime,
    new_token: TokenFactory,
    event: str,
    reason: str | None,
    undelivered: Mapping[str, str],
) -> Transition:
    b = _Builder(saga, now, new_token)
    b.not_run(undelivered)
    b.stop_forward()
    b.move(SagaState.COMPENSATING, None, event, reason)
    b.saga = replace(b.saga, completed_at=None, deadline_at=None)
    b.continue_compensation()
    return b.build()


def _on_resolved(
    saga: Saga, ev: CompensationResolved, now: datetime, new_token: TokenFactory
) -> Transition:
    if saga.state is not SagaState.COMPENSATION_FAILED:
        raise WrongState(f"saga is {saga.state}: only a compensation_failed saga can be resolved")
    step = next(s for s in saga.steps if s.status is StepStatus.COMPENSATION_FAILED)
    b = _Builder(saga, now, new_token)
    b.move(SagaState.COMPENSATING, step.name, f"compensation_resolved_{ev.resolution}", ev.reason)
    if ev.resolution is Resolution.RETRY:
        b.dispatch(step.position, CommandKind.COMPENSATE)
    else:
        b.set_step(step.position, status=StepStatus.COMPENSATED, compensated_at=now)
        b.continue_compensation()
    return b.build()


class _Builder:
    """Accumulates the changes of one transition."""

    def __init__(self, saga: Saga, now: datetime, new_token: TokenFactory) -> None:
        self.saga = saga
        self.now = now
        self.new_token = new_token
        self.steps = list(saga.steps)
        self.commands: list[Command] = []
        self.history: list[HistoryEntry] = []
        # Dependencies never change during a saga: one look for the whole transition.
        self.shape = graph.shape(saga.steps)

    def build(self) -> Transition:
        saga = replace(self.saga, steps=tuple(self.steps), updated_at=self.now)
        return Transition(saga=saga, commands=tuple(self.commands), history=tuple(self.history))

    def set_step(self, i: int, **changes: object) -> None:
        # Every outcome ends the command in flight: its token and deadline no longer apply.
        self.steps[i] = replace(
            self.steps[i],
            token=None,
            deadline_at=None,
            **changes,  # type: ignore[arg-type]
        )

    def record(
        self,
        from_state: SagaState | None,
        to_state: SagaState,
        step_name: str | None,
        event: str,
        reason: str | None = None,
    ) -> None:
        self.history.append(
            HistoryEntry(
                from_state=from_state,
                to_state=to_state,
                step_name=step_name,
                event=event,
                reason=reason,
            )
        )

    def record_step(self, step: Step, event: str, reason: str | None = None) -> None:
        self.record(self.saga.state, self.saga.state, step.name, event, reason)

    def move(self, to: SagaState, step_name: str | None, event: str, reason: str | None) -> None:
        self.record(self.saga.state, to, step_name, event, reason)
        # The deadline only ever applies to forward progress.
        deadline = self.saga.deadline_at if to is SagaState.STARTED else None
        self.saga = replace(self.saga, state=to, deadline_at=deadline)

    def finish(self, to: SagaState, event: str, reason: str | None = None) -> None:
        self.move(to, None, event, reason)
        self.saga = replace(self.saga, completed_at=self.now, deadline_at=None)

    def not_run(self, undelivered: Mapping[str, str]) -> None:
        """Steps in flight whose command provably reached no queue fail without having
        run: they are not awaited, and (unless an earlier attempt's outcome is unknown)
        not compensated."""
        for i, s in enumerate(self.steps):
            why = undelivered.get(s.id)
            if why is not None and s.status is StepStatus.STARTED:
                error = f"attempt {s.attempts} not run: {why}"
                self.set_step(i, status=StepStatus.FAILED, error=error, executed_at=self.now)
                self.record_step(s, "step_not_delivered", error)

    def stop_forward(self) -> None:
        """No step runs forward any more: pending ones are skipped, retries cancelled."""
        for i, s in enumerate(self.steps):
            if s.status is StepStatus.PENDING:
                self.steps[i] = replace(s, status=StepStatus.SKIPPED)
            elif s.status is StepStatus.RETRYING:
                self.set_step(i, status=StepStatus.FAILED, executed_at=self.now)
                self.record_step(s, "step_failed", "retry cancelled: the saga compensates")

    def has_something_to_compensate(self) -> bool:
        # A step still in flight forward (a parallel branch) may yet complete: wait for it.
        return any(_needs_compensation(s) or s.status is StepStatus.STARTED for s in self.steps)

    def advance(self) -> None:
        """Dispatch every pending step whose dependencies are all done (completed, or
        skipped by their condition); finish the saga when every step is."""
        deps = self.shape.deps
        done = (StepStatus.COMPLETED, StepStatus.SKIPPED)
        moved = True
        while moved:  # a skipped step may make others ready, before or after it
            moved = False
            for i in range(len(self.steps)):
                if self.saga.state is not SagaState.STARTED:
                    return  # a step failed before its dispatch (reference, condition)
                if self.steps[i].status is StepStatus.PENDING and all(
                    self.steps[d].status in done for d in deps[i]
                ):
                    moved |= self.start_step(i)
        if all(s.status in done for s in self.steps):
            self.finish(SagaState.COMPLETED, "saga_completed")

    def start_step(self, i: int) -> bool:
        """Dispatch a ready step, or skip it when its condition is false; True if it
        was skipped (its dependents may now be ready)."""
        step = self.steps[i]
        if step.when is not None:
            try:
                go = conditions.holds(step.when, self.saga.context, self.results(i))
            except conditions.ConditionFailed as exc:
                self.attempt_failed(
                    i, CommandKind.EXECUTE, _message(exc), retryable=False, unknown=False
                )
                return False
            if not go:
                self.steps[i] = replace(step, status=StepStatus.SKIPPED)
                self.record_step(step, "step_skipped", f"when {step.when!r} is false")
                return True
        self.dispatch(i, CommandKind.EXECUTE)
        return False

    def attempt_failed(
        self,
        i: int,
        kind: CommandKind,
        error: str | None,
        retryable: bool,
        *,
        unknown: bool,
        names_attempt: bool = False,
    ) -> None:
        """An attempt failed or timed out: retry it, or give up on the step.

        The history's reason for a retry names the attempt, unless ``error`` already
        does (``names_attempt``: a timeout's ``attempt 1 timed out after 30s``).
        """
        step = self.steps[i]
        if kind is CommandKind.EXECUTE:
            policy, attempts = step.retry, step.attempts
            can_retry = self.saga.state is SagaState.STARTED
        else:
            policy, attempts = step.compensation_retry, step.compensation_attempts
            can_retry = True
        if retryable and can_retry and attempts < policy.max_attempts:
            wait = backoff(policy, step.id, kind, attempts)
            self.set_step(
                i,
                status=StepStatus.RETRYING
                if kind is CommandKind.EXECUTE
                else StepStatus.COMPENSATION_RETRYING,
                error=error,
                outcome_unknown=unknown or step.outcome_unknown,
            )
            self.steps[i] = replace(self.steps[i], deadline_at=self.now + wait)
            event = (
                "step_attempt_failed"
                if kind is CommandKind.EXECUTE
                else "compensation_attempt_failed"
            )
            retry = f"retry in {wait.total_seconds():.3f}s"
            self.record_step(
                step,
                event,
                f"{error} ({retry})" if names_attempt else f"{error} (attempt {attempts}; {retry})",
            )
            return
        if kind is CommandKind.COMPENSATE:
            self.set_step(i, status=StepStatus.COMPENSATION_FAILED, error=error)
            self.record_step(step, "compensation_failed", error)
            self.move(SagaState.COMPENSATION_FAILED, step.name, "saga_compensation_failed", error)
            return
        self.set_step(
            i,
            status=StepStatus.FAILED,
            error=error,
            executed_at=self.now,
            outcome_unknown=unknown or step.outcome_unknown,
        )
        self.record_step(step, "step_failed", error)
        if self.saga.state is SagaState.STARTED:
            self.stop_forward()
            if self.has_something_to_compensate():
                self.move(SagaState.COMPENSATING, step.name, "compensation_started", error)
                self.continue_compensation()
            else:
                self.finish(SagaState.FAILED, "saga_failed", error)
        else:
            self.continue_compensation()

    def dispatch(self, i: int, kind: CommandKind) -> None:
        """Send attempt n+1 of the step's action or compensation."""
        step = self.steps[i]
        results = self.results(i)
        resolved = None
        if kind is CommandKind.EXECUTE and step.attempts == 0 and references.has_any(step.input):
            # Resolved once, at the first dispatch; the step keeps (and shows) the result.
            try:
                budget, why = self.input_budget(i)
                resolved = references.resolve(
                    step.input, self.saga.context, results, budget=budget, over_budget=why
                )
            except references.MissingValue as exc:
                self.attempt_failed(i, kind, _message(exc), retryable=False, unknown=False)
                return
            step = self.steps[i] = replace(step, input=resolved)
        token = self.new_token()
        deadline = self.now + step.timeout
        if kind is CommandKind.EXECUTE:
            attempt, action = step.attempts + 1, step.action
            self.steps[i] = replace(
                step, status=StepStatus.STARTED, attempts=attempt, token=token, deadline_at=deadline
            )
            event = "step_dispatched"
        else:
            assert step.compensation is not None
            attempt, action = step.compensation_attempts + 1, step.compensation
            self.steps[i] = replace(
                step,
                status=StepStatus.COMPENSATING,
                compensation_attempts=attempt,
                token=token,
                deadline_at=deadline,
            )
            event = "compensation_dispatched"
        self.commands.append(self._command(self.steps[i], kind, action, attempt, token, results))
        reason = f"attempt {attempt}" if attempt > 1 else None
        if resolved is not None:
            # Cut like any recorded text: GetSaga shows the whole input on the step.
            shown = json.dumps(resolved, separators=(",", ":"), ensure_ascii=False)
            reason = clean_text("input: " + shown, MAX_ERROR_MESSAGE_CHARS)
        self.record_step(step, event, reason)

    def results(self, i: int) -> dict[str, JsonObject]:
        """The outputs of the completed steps step ``i`` depends on, directly or not."""
        above = self.shape.ancestors[i]
        return {
            self.steps[j].name: self.steps[j].output or {}
            for j in sorted(above)
            if self.steps[j].status is StepStatus.COMPLETED or self.steps[j].output is not None
        }

    def input_budget(self, i: int) -> tuple[int, str | None]:
        """What step ``i``'s references may bring in (bytes, and why when it is less than
        an input's worth): the saga's inputs together stay within
        :data:`MAX_SAGA_INPUT_BYTES`."""
        left = MAX_SAGA_INPUT_BYTES - sum(json_size(s.input) for s in self.steps)
        if left >= references.MAX_RESOLVED_BYTES:
            return references.MAX_RESOLVED_BYTES, None
        return max(left, 0), f"the saga's inputs would pass {MAX_SAGA_INPUT_BYTES} bytes"

    def continue_compensation(self) -> None:
        """Dispatch every compensation whose dependents are all undone; finish when none
        is left, or stop in COMPENSATION_FAILED while one waits for a person."""
        if self.saga.state is SagaState.COMPENSATION_FAILED:
            return  # a person decides first (ResolveCompensation calls us again)
        if any(s.status is StepStatus.STARTED for s in self.steps):
            return  # forward steps in flight are awaited: they may need undoing too
        below = self.shape.descendants
        for i in reversed(range(len(self.steps))):
            if _needs_compensation(self.steps[i]) and all(
                _settled(self.steps[j]) for j in below[i]
            ):
                self.dispatch(i, CommandKind.COMPENSATE)
        undoing = (StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRYING)
        if any(s.status in undoing for s in self.steps):
            return  # a reply or a retry is awaited; it will call us again
        stuck = next((s for s in self.steps if s.status is StepStatus.COMPENSATION_FAILED), None)
        if stuck is not None:
            # Another branch's compensation failed for good while this one was undone.
            self.move(
                SagaState.COMPENSATION_FAILED, stuck.name, "saga_compensation_failed", stuck.error
            )
            return
        self.finish(SagaState.COMPENSATED, "saga_compensated")

    def _command(
        self,
        step: Step,
        kind: CommandKind,
        action: str,
        attempt: int,
        token: str,
        results: dict[str, JsonObject],
    ) -> Command:
        return Command(
            saga_id=self.saga.id,
            saga_name=self.saga.name,
            step_id=step.id,
            step_name=step.name,
            kind=kind,
            action=action,
            attempt=attempt,
            input=step.input,
            output=step.output if kind is CommandKind.COMPENSATE else None,
            context=self.saga.context,
            token=token,
            results=results,
            # What the timer acts on: the participant ends its work by the same instant.
            deadline_at=step.deadline_at,
            timeout=step.timeout,
        )


def _message(exc: Exception) -> str:
    """The error text of a failure the engine decides on (a reference or condition that
    names what is in the saga): bounded like a participant's."""
    return clean_text(str(exc), MAX_ERROR_MESSAGE_CHARS)


def _settled(step: Step) -> bool:
    """Nothing of the step is left to undo or being undone (its ancestors may go)."""
    undoing = (
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_RETRYING,
        StepStatus.COMPENSATION_FAILED,
    )
    return step.status not in undoing and not _needs_compensation(step)


def _needs_compensation(step: Step) -> bool:
    """Completed, or failed after a timeout (it may have taken effect), and undoable."""
    if not step.compensation:
        return False
    return step.status is StepStatus.COMPLETED or (
        step.status is StepStatus.FAILED and step.outcome_unknown
    )
