"""Property-based tests of the pure saga state machine: random replies, replays, forgeries,
and (second half) timers, retryable failures, the saga deadline and operator resolutions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import pairwise

import pytest
from engine_helpers import T0, Tokens, at, fspec, policy, reply_to, specs, start_saga
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.engine import (
    Command,
    CommandKind,
    CompensateRequested,
    CompensationResolved,
    Event,
    HistoryEntry,
    Resolution,
    RetryPolicy,
    Saga,
    SagaDeadlinePassed,
    SagaState,
    Step,
    StepReplied,
    StepSpec,
    StepStatus,
    TimerFired,
    Transition,
    WrongState,
    apply,
    start,
)

S = SagaState
EXEC = CommandKind.EXECUTE
COMP = CommandKind.COMPENSATE

END_STATES = {S.COMPLETED, S.FAILED, S.COMPENSATED, S.COMPENSATION_FAILED}
DONE_STATES = {S.COMPLETED, S.FAILED, S.COMPENSATED}
IN_FLIGHT_STATUSES = {StepStatus.STARTED, StepStatus.COMPENSATING}

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def in_flight_steps(saga: Saga) -> list[int]:
    return [s.position for s in saga.steps if s.status in IN_FLIGHT_STATUSES]


@dataclass
class Run:
    """Feeds events to the engine and checks per-transition invariants on each one."""

    flags: list[bool]
    tokens: Tokens = field(default_factory=Tokens)
    clock: int = 0
    saga: Saga = field(init=False)
    commands: list[Command] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    delivered: list[StepReplied] = field(default_factory=list)
    executed_ok: set[int] = field(default_factory=set)
    """Positions whose execute success was applied."""
    compensate_requested: bool = False
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = start_saga(specs(*self.flags), tokens=self.tokens)
        self.saga = t.saga
        assert len(t.commands) == 1
        assert t.commands[0].step_id == self.saga.steps[0].id
        self._record(t)
        self._check_saga(self.saga)

    # --- helpers ------------------------------------------------------------------------------

    def in_flight(self) -> Command | None:
        held = [s.token for s in self.saga.steps if s.token is not None]
        assert len(held) <= 1, f"more than one command in flight: {held}"
        if not held:
            return None
        matches = [c for c in self.commands if c.token == held[0]]
        assert len(matches) == 1
        return matches[0]

    def _record(self, t: Transition) -> None:
        self.commands.extend(t.commands)
        self.history.extend(t.history)

    def _check_saga(self, saga: Saga) -> None:
        flying = in_flight_steps(saga)
        assert len(flying) <= 1, f"steps in flight: {flying}"
        holders = [s.position for s in saga.steps if s.token is not None]
        assert holders == flying, "exactly the in-flight step holds a token"
        if saga.state in DONE_STATES or saga.state is S.COMPENSATION_FAILED:
            assert flying == []
        if saga.state in (S.STARTED, S.COMPENSATING):
            assert len(flying) == 1, f"{saga.state} saga with nothing in flight would stall"
        assert (saga.completed_at is not None) == (saga.state in DONE_STATES)
        for s in saga.steps:
            assert s.attempts <= 1 and s.compensation_attempts <= 1  # no retries in the engine
            if s.compensation_attempts:
                assert s.compensation is not None
                assert s.attempts == 1

    # --- applying events ----------------------------------------------------------------------

    def apply(self, event: Event) -> Transition:
        before = self.saga
        expected_cmd = self.in_flight()
        self.clock += 1
        now = at(self.clock)
        issued_before = len(self.tokens.issued)
        t = apply(before, event, now=now, new_token=self.tokens)
        self.events.append(event)

        if isinstance(event, StepReplied):
            matches = expected_cmd is not None and (
                event.step_id,
                event.kind,
                event.attempt,
                event.token,
            ) == (
                expected_cmd.step_id,
                expected_cmd.kind,
                expected_cmd.attempt,
                expected_cmd.token,
            )
            assert (t.ignored is None) == matches, (event, expected_cmd, t.ignored)

        if t.ignored is not None:
            assert t.saga is before
            assert t.saga == before
            assert t.commands == ()
            assert t.history == ()
            assert len(self.tokens.issued) == issued_before
            return t

        after = t.saga
        # Something changed, so it is recorded, and the history chain stays consistent.
        assert len(t.history) >= 1
        assert t.history[0].from_state is before.state
        for prev, nxt in pairwise(t.history):
            assert nxt.from_state is prev.to_state
        assert t.history[-1].to_state is after.state
        assert after.updated_at == now
        assert after.created_at == before.created_at
        assert (after.id, after.name, after.context) == (before.id, before.name, before.context)

        # At most one command, and nothing from sagas that are over.
        assert len(t.commands) <= 1
        assert before.state not in (S.FAILED, S.COMPENSATED)
        if before.state is S.COMPLETED:
            assert isinstance(event, CompensateRequested)
        assert len(self.tokens.issued) - issued_before == len(t.commands)

        # Attempts rise by exactly one per dispatch, and only for the dispatched step.
        for b, a in zip(before.steps, after.steps, strict=True):
            assert (a.id, a.position, a.action, a.compensation, a.input) == (
                b.id,
                b.position,
                b.action,
                b.compensation,
                b.input,
            )
            ex = [c for c in t.commands if c.step_id == a.id and c.kind is EXEC]
            co = [c for c in t.commands if c.step_id == a.id and c.kind is COMP]
            assert a.attempts - b.attempts == len(ex)
            assert a.compensation_attempts - b.compensation_attempts == len(co)
            if ex:
                assert b.status is StepStatus.PENDING
                assert a.status is StepStatus.STARTED
            if co:
                assert a.status is StepStatus.COMPENSATING

        for c in t.commands:
            step = after.step_by_id(c.step_id)
            assert step is not None
            assert step.token == c.token
            assert c.token not in {x.token for x in self.commands}
            assert (c.saga_id, c.saga_name, c.step_name, c.context, c.input) == (
                after.id,
                after.name,
                step.name,
                after.context,
                step.input,
            )
            if c.kind is EXEC:
                assert (c.action, c.attempt, c.output) == (step.action, step.attempts, None)
                assert after.state is S.STARTED
            else:
                assert (c.action, c.attempt) == (step.compensation, step.compensation_attempts)
                assert c.output == step.output
                assert after.state is S.COMPENSATING

        if isinstance(event, StepReplied):
            self.delivered.append(event)
            if event.kind is EXEC and event.succeeded:
                step = after.step_by_id(event.step_id)
                assert step is not None
                self.executed_ok.add(step.position)
        self.saga = after
        self._record(t)
        self._check_saga(after)
        return t

    # --- actions ------------------------------------------------------------------------------

    def answer(self, ok: bool) -> None:
        cmd = self.in_flight()
        assert cmd is not None
        self.apply(reply_to(cmd, ok=ok, output={"from": cmd.step_name}))

    def replay(self, index: int, flip: bool) -> None:
        old = self.delivered[index % len(self.delivered)]
        ev = replace(old, succeeded=not old.succeeded) if flip else old
        t = self.apply(ev)
        assert t.ignored is not None, "a reply that was already applied must not apply again"

    def forge(self, how: str) -> None:
        cmd = self.in_flight() or self.commands[-1]
        forged = {
            "token": lambda: reply_to(cmd, token="forged-" + cmd.token),
            "attempt": lambda: reply_to(cmd, attempt=cmd.attempt + 1),
            "kind": lambda: reply_to(cmd, kind=COMP if cmd.kind is EXEC else EXEC),
            "step": lambda: reply_to(cmd, step_id="nope"),
        }[how]()
        t = self.apply(forged)
        assert t.ignored is not None

    def compensate(self) -> None:
        before = self.saga
        if before.state is S.COMPENSATION_FAILED:
            with pytest.raises(WrongState):
                apply(before, CompensateRequested(reason="r"), now=at(0), new_token=self.tokens)
            return
        t = self.apply(CompensateRequested(reason="r"))
        if before.state in (S.COMPENSATING, S.COMPENSATED, S.FAILED):
            assert t.ignored is not None
        else:
            assert t.ignored is None
            self.compensate_requested = True
            assert t.saga.state in (S.COMPENSATING, S.COMPENSATED)
            assert not any(s.status is StepStatus.PENDING for s in t.saga.steps)

    # --- final checks -------------------------------------------------------------------------

    def check_final(self) -> None:
        saga = self.saga
        assert self.in_flight() is None
        assert saga.state in END_STATES

        chain = self.history
        assert chain[0].from_state is None
        assert chain[0].event == "saga_started"
        for prev, nxt in pairwise(chain):
            assert nxt.from_state is prev.to_state
        assert chain[-1].to_state is saga.state

        compensable_done = sorted(
            (p for p in self.executed_ok if self.flags[p]),
            reverse=True,
        )
        comps = [c for c in self.commands if c.kind is COMP]
        comp_positions = [saga.step_by_id(c.step_id).position for c in comps]  # type: ignore[union-attr]
        assert len(comp_positions) == len(set(comp_positions)), "each compensation at most once"

        if saga.state is S.COMPLETED:
            assert self.executed_ok == set(range(len(self.flags)))
            assert comps == []
            assert not self.compensate_requested
        elif saga.state is S.FAILED:
            assert comps == []
            assert compensable_done == []
            assert not self.compensate_requested
            assert sum(s.status is StepStatus.FAILED for s in saga.steps) == 1
        elif saga.state is S.COMPENSATED:
            assert comp_positions == compensable_done
            for s in saga.steps:
                if s.position in compensable_done:
                    assert s.status is StepStatus.COMPENSATED
                else:
                    assert s.status in (
                        StepStatus.COMPLETED,
                        StepStatus.FAILED,
                        StepStatus.SKIPPED,
                    )
                    assert s.status is not StepStatus.COMPLETED or s.compensation is None
        else:  # COMPENSATION_FAILED: stops at the failed compensation
            assert comp_positions == compensable_done[: len(comp_positions)]
            failed = [s for s in saga.steps if s.status is StepStatus.COMPENSATION_FAILED]
            assert [s.position for s in failed] == comp_positions[-1:]
            for p in comp_positions[:-1]:
                assert saga.steps[p].status is StepStatus.COMPENSATED

        # Steps never dispatched are skipped unless the saga completed.
        if saga.state is not S.COMPLETED:
            for s in saga.steps:
                if s.attempts == 0:
                    assert s.status is StepStatus.SKIPPED
        # Nothing forward was dispatched past the first failure.
        failed_exec = [s.position for s in saga.steps if s.status is StepStatus.FAILED]
        if failed_exec:
            assert all(s.attempts == 0 for s in saga.steps[failed_exec[0] + 1 :])


ACTIONS = ["succeed", "succeed", "succeed", "fail", "replay", "forge", "compensate"]
"""Success is weighted up so that runs get deep enough to have something to compensate."""


def drive(data: st.DataObject, flags: list[bool], budget: int) -> Run:
    run = Run(flags)
    for _ in range(budget):
        flying = run.in_flight() is not None
        choices = [a for a in ACTIONS if flying or a not in ("succeed", "fail")]
        if not run.delivered:
            choices = [a for a in choices if a != "replay"]
        action = data.draw(st.sampled_from(choices), label="action")
        if action == "succeed":
            run.answer(True)
        elif action == "fail":
            run.answer(False)
        elif action == "replay":
            run.replay(data.draw(st.integers(0, 100)), data.draw(st.booleans()))
        elif action == "forge":
            run.forge(data.draw(st.sampled_from(["token", "attempt", "kind", "step"])))
        else:
            run.compensate()
        if run.in_flight() is None and data.draw(st.booleans(), label="stop"):
            break
    return run


DRAIN_OK = st.sampled_from([True, True, True, False])


def drain(run: Run, outcomes: st.DataObject | None) -> None:
    # Every applied reply moves the saga on, so this ends within 2 replies per step.
    for _ in range(2 * len(run.flags) + 1):
        if run.in_flight() is None:
            return
        ok = True if outcomes is None else outcomes.draw(DRAIN_OK, label="drain ok")
        run.answer(ok)
    raise AssertionError("saga still has a command in flight after draining")


flags_st = st.lists(st.booleans(), min_size=1, max_size=8)


@SETTINGS
@given(data=st.data(), flags=flags_st, budget=st.integers(0, 30))
def test_random_runs_end_in_an_end_state_with_correct_compensations(
    data: st.DataObject, flags: list[bool], budget: int
) -> None:
    run = drive(data, flags, budget)
    drain(run, data)
    run.check_final()


@SETTINGS
@given(data=st.data(), flags=flags_st, budget=st.integers(0, 30))
def test_draining_with_successes_ends_in_an_end_state(
    data: st.DataObject, flags: list[bool], budget: int
) -> None:
    run = drive(data, flags, budget)
    drain(run, None)
    run.check_final()
    # After the end, nothing but Compensate on COMPLETED can produce a command.
    for cmd in run.commands:
        t = run.apply(reply_to(cmd))
        assert t.ignored is not None


@settings(max_examples=150, deadline=None)
@given(data=st.data(), flags=flags_st, budget=st.integers(0, 30))
def test_engine_is_deterministic(data: st.DataObject, flags: list[bool], budget: int) -> None:
    """Replaying the same events with the same token sequence gives the same saga."""
    run = drive(data, flags, budget)
    drain(run, data)
    replayed = Run(flags)
    for ev in run.events:
        replayed.apply(ev)
    assert replayed.saga == run.saga
    assert replayed.commands == run.commands
    assert replayed.history == run.history


@settings(max_examples=100, deadline=None)
@given(flags=flags_st, fail_at=st.integers(0, 7))
def test_forward_failure_compensates_exactly_the_compensable_completed_prefix(
    flags: list[bool], fail_at: int
) -> None:
    fail_at %= len(flags)
    run = Run(flags)
    for _ in range(fail_at):
        run.answer(True)
    run.answer(False)
    order = []
    while (cmd := run.in_flight()) is not None:
        assert cmd.kind is COMP
        order.append(run.saga.step_by_id(cmd.step_id).position)  # type: ignore[union-attr]
        run.answer(True)
    expected = [p for p in reversed(range(fail_at)) if flags[p]]
    assert order == expected
    assert run.saga.state is (S.COMPENSATED if expected else S.FAILED)
    run.check_final()


# === Failure semantics: retries, timeouts, compensation retries, resolution, saga deadline ====

RETRY_STATUSES = {StepStatus.RETRYING, StepStatus.COMPENSATION_RETRYING}
TIMED_STATUSES = IN_FLIGHT_STATUSES | RETRY_STATUSES
"""Exactly the statuses in which a step has a ``deadline_at``."""

ALLOWED_STEP_MOVES: dict[StepStatus, set[StepStatus]] = {
    StepStatus.PENDING: {StepStatus.STARTED, StepStatus.SKIPPED},
    StepStatus.STARTED: {
        StepStatus.RETRYING,
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.COMPENSATING,  # completed or timed out, and compensated at once
    },
    StepStatus.RETRYING: {StepStatus.STARTED, StepStatus.FAILED, StepStatus.COMPENSATING},
    StepStatus.COMPLETED: {StepStatus.COMPENSATING},
    StepStatus.FAILED: {StepStatus.COMPENSATING},
    StepStatus.COMPENSATING: {
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_RETRYING,
        StepStatus.COMPENSATION_FAILED,
    },
    StepStatus.COMPENSATION_RETRYING: {StepStatus.COMPENSATING},
    StepStatus.COMPENSATION_FAILED: {StepStatus.COMPENSATING, StepStatus.COMPENSATED},
    StepStatus.COMPENSATED: set(),
    StepStatus.SKIPPED: set(),
}

SECOND = timedelta(seconds=1)


def backoff_cap(p: RetryPolicy, attempt: int) -> timedelta:
    return timedelta(
        seconds=min(
            p.max_interval.total_seconds(),
            p.initial_interval.total_seconds() * p.backoff_coefficient ** (attempt - 1),
        )
    )


@dataclass
class FailureRun:
    """Like :class:`Run`, with a fake clock, timers, retryable failures and resolutions."""

    step_specs: list[StepSpec]
    saga_timeout: timedelta | None = None
    tokens: Tokens = field(default_factory=Tokens)
    now: datetime = T0
    saga: Saga = field(init=False)
    commands: list[Command] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    delivered: list[StepReplied] = field(default_factory=list)
    executed_ok: set[int] = field(default_factory=set)
    """Positions whose execute success was applied."""
    timed_out: set[int] = field(default_factory=set)
    """Positions one of whose execute attempts timed out (TimerFired while STARTED)."""
    last_timed_out: set[int] = field(default_factory=set)
    """Positions whose latest execute attempt timed out (no reply applied since)."""
    compensated: Counter[int] = field(default_factory=Counter)
    """Per position: compensation successes applied plus MARK_COMPENSATED resolutions."""
    operator_retries: Counter[int] = field(default_factory=Counter)
    """Per position: RETRY resolutions applied."""
    comp_order: list[int] = field(default_factory=list)
    """Positions of compensation commands, in dispatch order."""
    compensate_requested: bool = False
    events: list[tuple[Event, datetime]] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = start(
            saga_id="saga-1",
            name="order.place",
            steps=self.step_specs,
            step_ids=[f"id-{i}" for i in range(len(self.step_specs))],
            context={"customer": "c1"},
            idempotency_key=None,
            now=self.now,
            new_token=self.tokens,
            timeout=self.saga_timeout,
        )
        self.saga = t.saga
        assert self.saga.deadline_at == (
            T0 + self.saga_timeout if self.saga_timeout is not None else None
        )
        assert len(t.commands) == 1
        assert self.saga.steps[0].deadline_at == T0 + self.saga.steps[0].timeout
        self.commands.extend(t.commands)
        self.history.extend(t.history)
        self._check_saga(self.saga)

    # --- helpers ------------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.step_specs)

    def compensable(self, p: int) -> bool:
        return self.step_specs[p].compensation is not None

    def in_flight(self) -> Command | None:
        held = [s.token for s in self.saga.steps if s.token is not None]
        assert len(held) <= 1, f"more than one command in flight: {held}"
        if not held:
            return None
        matches = [c for c in self.commands if c.token == held[0]]
        assert len(matches) == 1
        return matches[0]

    def active_step(self) -> Step | None:
        """The step with a deadline: its command in flight, or its retry pending."""
        active = [s for s in self.saga.steps if s.status in TIMED_STATUSES]
        assert len(active) <= 1
        return active[0] if active else None

    def retrying_step(self) -> Step | None:
        s = self.active_step()
        return s if s is not None and s.status in RETRY_STATUSES else None

    def _expected_to_apply(self, before: Saga, event: Event, now: datetime) -> bool:
        if isinstance(event, StepReplied):
            cmd = self.in_flight()
            return cmd is not None and (event.step_id, event.kind, event.attempt, event.token) == (
                cmd.step_id,
                cmd.kind,
                cmd.attempt,
                cmd.token,
            )
        if isinstance(event, TimerFired):
            step = before.step_by_id(event.step_id)
            return step is not None and step.deadline_at is not None and step.deadline_at <= now
        if isinstance(event, SagaDeadlinePassed):
            return (
                before.state is S.STARTED
                and before.deadline_at is not None
                and before.deadline_at <= now
            )
        if isinstance(event, CompensateRequested):
            return before.state in (S.STARTED, S.COMPLETED)
        assert isinstance(event, CompensationResolved)
        return True  # or WrongState, checked by resolve()

    def _check_saga(self, saga: Saga) -> None:
        flying = in_flight_steps(saga)
        assert len(flying) <= 1, f"steps in flight: {flying}"
        holders = [s.position for s in saga.steps if s.token is not None]
        assert holders == flying, "exactly the in-flight step holds a token"
        active = [s.position for s in saga.steps if s.status in TIMED_STATUSES]
        assert len(active) <= 1, f"more than one step running or retrying: {active}"
        failed_comp = [s for s in saga.steps if s.status is StepStatus.COMPENSATION_FAILED]
        if saga.state in (S.STARTED, S.COMPENSATING):
            assert len(active) == 1, f"{saga.state} saga with nothing to wait for would stall"
            assert failed_comp == []
        elif saga.state is S.COMPENSATION_FAILED:
            assert active == []
            assert len(failed_comp) == 1
        else:
            assert active == []
            assert failed_comp == []
        assert (saga.completed_at is not None) == (saga.state in DONE_STATES)
        if saga.state in DONE_STATES:
            assert saga.deadline_at is None
        for s in saga.steps:
            # deadline_at is set iff the step waits for a reply or for its next attempt.
            assert (s.deadline_at is not None) == (s.status in TIMED_STATUSES), s
            assert s.attempts <= s.retry.max_attempts, "execute attempts beyond max_attempts"
            assert (
                s.compensation_attempts
                <= s.compensation_retry.max_attempts + self.operator_retries[s.position]
            ), "compensation attempts beyond max_attempts without an operator RETRY"
            if s.compensation_attempts:
                assert s.compensation is not None
                assert s.attempts >= 1
            if saga.state is S.STARTED:
                assert s.compensation_attempts == 0
            if s.status is StepStatus.PENDING:
                assert saga.state is S.STARTED
            if s.status is StepStatus.COMPLETED:
                assert not s.outcome_unknown, "a reply settled the outcome"
        self._probe(saga)

    def _probe(self, saga: Saga) -> None:
        """Events that must not apply in this state (tried on the side, not recorded)."""
        far = self.now + timedelta(days=365)
        if saga.state is not S.STARTED:
            t = apply(saga, SagaDeadlinePassed(), now=far, new_token=self.tokens)
            assert t.ignored is not None and t.saga is saga, "the deadline applies only if started"
        for s in saga.steps:
            if s.deadline_at is None:
                t = apply(saga, TimerFired(step_id=s.id), now=far, new_token=self.tokens)
                assert t.ignored is not None and t.saga is saga, "a timer without a deadline"
        if saga.state is not S.COMPENSATION_FAILED:
            for resolution in Resolution:
                with pytest.raises(WrongState):
                    apply(
                        saga,
                        CompensationResolved(resolution=resolution, reason="probe"),
                        now=far,
                        new_token=self.tokens,
                    )
            assert (s.status is StepStatus.COMPENSATED) == (self.compensated[s.position] == 1)

    # --- applying events ----------------------------------------------------------------------

    def apply(self, event: Event, *, now: datetime | None = None) -> Transition:
        now = self.now + SECOND if now is None else now
        assert now >= self.now, "the fake clock never goes back"
        before = self.saga
        expected_cmd = self.in_flight()
        issued_before = len(self.tokens.issued)
        should_apply = self._expected_to_apply(before, event, now)
        t = apply(before, event, now=now, new_token=self.tokens)
        self.now = now
        self.events.append((event, now))
        assert (t.ignored is None) == should_apply, (event, before.state, t.ignored)

        if t.ignored is not None:
            assert t.saga is before
            assert t.commands == ()
            assert t.history == ()
            assert len(self.tokens.issued) == issued_before
            return t

        after = t.saga
        assert len(t.history) >= 1
        assert t.history[0].from_state is before.state
        for prev, nxt in pairwise(t.history):
            assert nxt.from_state is prev.to_state
        assert t.history[-1].to_state is after.state
        assert after.updated_at == now
        assert (after.id, after.name, after.context, after.created_at) == (
            before.id,
            before.name,
            before.context,
            before.created_at,
        )

        # Nothing happens to a saga that is over; a completed one can only be compensated,
        # a compensation_failed one only resolved.
        assert before.state not in (S.FAILED, S.COMPENSATED)
        if before.state is S.COMPLETED:
            assert isinstance(event, CompensateRequested)
        if before.state is S.COMPENSATION_FAILED:
            assert isinstance(event, CompensationResolved)
        assert len(t.commands) <= 1
        assert len(self.tokens.issued) - issued_before == len(t.commands)

        # What the event tells us independently of the engine.
        if isinstance(event, StepReplied):
            self.delivered.append(event)
            step = before.step_by_id(event.step_id)
            assert step is not None and expected_cmd is not None
            if event.kind is EXEC:
                self.last_timed_out.discard(step.position)
            if event.kind is EXEC and event.succeeded:
                self.executed_ok.add(step.position)
            if event.kind is COMP and event.succeeded:
                self.compensated[step.position] += 1
        if isinstance(event, TimerFired):
            step = before.step_by_id(event.step_id)
            assert step is not None
            if step.status is StepStatus.STARTED:
                self.timed_out.add(step.position)
                self.last_timed_out.add(step.position)
        if isinstance(event, CompensationResolved):
            (failed,) = [s for s in before.steps if s.status is StepStatus.COMPENSATION_FAILED]
            if event.resolution is Resolution.RETRY:
                self.operator_retries[failed.position] += 1
            else:
                self.compensated[failed.position] += 1
        assert all(v <= 1 for v in self.compensated.values()), "a step compensated twice"

        for b, a in zip(before.steps, after.steps, strict=True):
            assert (a.id, a.position, a.action, a.compensation, a.input) == (
                b.id,
                b.position,
                b.action,
                b.compensation,
                b.input,
            )
            assert (a.retry, a.compensation_retry, a.timeout) == (
                b.retry,
                b.compensation_retry,
                b.timeout,
            )
            if a.status is not b.status:
                assert a.status in ALLOWED_STEP_MOVES[b.status], (b.status, a.status, event)
            ex = [c for c in t.commands if c.step_id == a.id and c.kind is EXEC]
            co = [c for c in t.commands if c.step_id == a.id and c.kind is COMP]
            assert a.attempts - b.attempts == len(ex)
            assert a.compensation_attempts - b.compensation_attempts == len(co)
            if ex:
                assert b.status in (StepStatus.PENDING, StepStatus.RETRYING)
                if b.status is StepStatus.RETRYING:
                    assert event == TimerFired(step_id=a.id), "a retry is sent by its timer"
                assert a.status is StepStatus.STARTED
            if co:
                assert a.status is StepStatus.COMPENSATING
                if b.status is StepStatus.COMPENSATION_RETRYING:
                    assert event == TimerFired(step_id=a.id), "a retry is sent by its timer"
                if b.status is StepStatus.COMPENSATION_FAILED:
                    assert isinstance(event, CompensationResolved)
                    assert event.resolution is Resolution.RETRY
                # Only what completed, or may have taken effect, is compensated.
                assert a.position in self.executed_ok | self.timed_out
                assert a.compensation is not None
            if ex or co:
                assert a.deadline_at == now + a.timeout
            elif a.status in RETRY_STATUSES and (a.status, a.deadline_at) != (
                b.status,
                b.deadline_at,
            ):
                # A retry was just scheduled: due within the backoff cap of the failed attempt.
                p, n = (
                    (a.retry, a.attempts)
                    if a.status is StepStatus.RETRYING
                    else (a.compensation_retry, a.compensation_attempts)
                )
                assert a.deadline_at is not None
                assert now <= a.deadline_at <= now + backoff_cap(p, n)
            if a.outcome_unknown and a.status in (StepStatus.FAILED, StepStatus.RETRYING):
                assert a.position in self.timed_out

        for c in t.commands:
            step = after.step_by_id(c.step_id)
            assert step is not None
            assert step.token == c.token
            assert c.token not in {x.token for x in self.commands}
            assert (c.saga_id, c.saga_name, c.step_name, c.context, c.input) == (
                after.id,
                after.name,
                step.name,
                after.context,
                step.input,
            )
            if c.kind is EXEC:
                assert (c.action, c.attempt, c.output) == (step.action, step.attempts, None)
                assert after.state is S.STARTED
            else:
                assert (c.action, c.attempt) == (step.compensation, step.compensation_attempts)
                assert c.output == step.output
                assert after.state is S.COMPENSATING
                if self.comp_order and self.comp_order[-1] != step.position:
                    # Newest first, and one step's compensation is finished before the next.
                    assert step.position < self.comp_order[-1], (self.comp_order, step.position)
                self.comp_order.append(step.position)

        self.saga = after
        self.commands.extend(t.commands)
        self.history.extend(t.history)
        self._check_saga(after)
        return t

    # --- actions ------------------------------------------------------------------------------

    def answer(self, ok: bool, *, retryable: bool = False) -> None:
        cmd = self.in_flight()
        assert cmd is not None
        self.apply(
            reply_to(cmd, ok=ok, output={"from": cmd.step_name}, error="x", retryable=retryable)
        )

    def fire(self, step: Step, late: timedelta = timedelta(0)) -> Transition:
        """TimerFired for ``step`` once its deadline passed (``late`` after it, or now)."""
        assert step.deadline_at is not None
        t = self.apply(TimerFired(step_id=step.id), now=max(self.now, step.deadline_at + late))
        assert t.ignored is None
        return t

    def fire_early(self) -> bool:
        step = self.active_step()
        if step is None or step.deadline_at is None or step.deadline_at <= self.now:
            return False
        t = self.apply(TimerFired(step_id=step.id), now=self.now)
        assert t.ignored is not None
        return True

    def stray_timer(self, index: int, late: timedelta) -> None:
        self.apply(TimerFired(step_id=f"id-{index % (self.n + 1)}"), now=self.now + late)

    def saga_deadline(self, offset: timedelta) -> None:
        deadline = self.saga.deadline_at
        now = self.now + SECOND if deadline is None else max(self.now, deadline + offset)
        self.apply(SagaDeadlinePassed(), now=now)

    def resolve(self, resolution: Resolution) -> None:
        ev = CompensationResolved(resolution=resolution, reason="operator")
        if self.saga.state is not S.COMPENSATION_FAILED:
            with pytest.raises(WrongState):
                apply(self.saga, ev, now=self.now, new_token=self.tokens)
            return
        t = self.apply(ev)
        assert t.history[0].event == f"compensation_resolved_{resolution}"

    def replay(self, index: int, flip: bool) -> None:
        old = self.delivered[index % len(self.delivered)]
        ev = replace(old, succeeded=not old.succeeded) if flip else old
        t = self.apply(ev)
        assert t.ignored is not None, "a reply that was already applied must not apply again"

    def forge(self, how: str) -> None:
        cmd = self.in_flight() or self.commands[-1]
        forged = {
            "token": lambda: reply_to(cmd, token="forged-" + cmd.token),
            "attempt": lambda: reply_to(cmd, attempt=cmd.attempt + 1),
            "kind": lambda: reply_to(cmd, kind=COMP if cmd.kind is EXEC else EXEC),
            "step": lambda: reply_to(cmd, step_id="nope"),
        }[how]()
        t = self.apply(forged)
        assert t.ignored is not None

    def compensate(self) -> None:
        before = self.saga
        if before.state is S.COMPENSATION_FAILED:
            with pytest.raises(WrongState):
                apply(before, CompensateRequested(reason="r"), now=self.now, new_token=self.tokens)
            return
        t = self.apply(CompensateRequested(reason="r"))
        if t.ignored is None:
            self.compensate_requested = True
            assert not any(s.status is StepStatus.PENDING for s in t.saga.steps)
            assert not any(s.status is StepStatus.RETRYING for s in t.saga.steps)

    # --- final checks -------------------------------------------------------------------------

    def needs_compensation(self) -> set[int]:
        """Compensable steps that completed or whose outcome the engine deems unknown.

        Whether a step one of whose attempts timed out, but whose last attempt failed
        with a reply, counts as unknown is the engine's call (it does: the flag is
        sticky); bounded on both sides here by what the events themselves say.
        """
        compensable = {p for p in range(self.n) if self.compensable(p)}
        unknown = {p for p in self.timed_out if self.saga.steps[p].outcome_unknown}
        needs = compensable & (self.executed_ok | unknown)
        assert compensable & (self.executed_ok | self.last_timed_out) <= needs
        assert needs <= compensable & (self.executed_ok | self.timed_out)
        return needs

    def check_final(self, *, resolved: bool) -> None:
        saga = self.saga
        assert self.active_step() is None
        assert saga.state in (DONE_STATES if resolved else END_STATES)
        chain = self.history
        assert chain[0].from_state is None
        assert chain[0].event == "saga_started"
        for prev, nxt in pairwise(chain):
            assert nxt.from_state is prev.to_state
        assert chain[-1].to_state is saga.state

        comps = [c for c in self.commands if c.kind is COMP]
        order = [p for i, p in enumerate(self.comp_order) if i == 0 or self.comp_order[i - 1] != p]
        assert order == sorted(set(order), reverse=True), "compensations newest first, once each"
        expected = sorted(self.needs_compensation(), reverse=True)
        if saga.state is S.COMPLETED:
            assert self.executed_ok == set(range(self.n))
            assert all(s.status is StepStatus.COMPLETED for s in saga.steps)
            assert comps == []
        elif saga.state is S.FAILED:
            assert comps == []
            assert not self.compensate_requested
            assert sum(s.status is StepStatus.FAILED for s in saga.steps) == 1
            assert expected == []
        elif saga.state is S.COMPENSATED:
            assert order == expected
            for s in saga.steps:
                if s.position in expected:
                    assert s.status is StepStatus.COMPENSATED
                else:
                    assert s.status in (StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED)
                    assert s.compensation_attempts == 0
        else:
            assert order == expected[: len(order)]
            failed = [s.position for s in saga.steps if s.status is StepStatus.COMPENSATION_FAILED]
            assert failed == order[-1:]
            for p in order[:-1]:
                assert saga.steps[p].status is StepStatus.COMPENSATED
        if saga.state is not S.COMPLETED:
            for s in saga.steps:
                if s.attempts == 0:
                    assert s.status is StepStatus.SKIPPED
        failed_exec = [s.position for s in saga.steps if s.status is StepStatus.FAILED]
        assert len(failed_exec) <= 1
        if failed_exec:
            assert all(s.attempts == 0 for s in saga.steps[failed_exec[0] + 1 :])

    def check_inert(self) -> None:
        """Once over, nothing (replies, timers, the deadline) moves the saga any more."""
        assert self.saga.state in DONE_STATES | {S.COMPENSATION_FAILED}
        far = timedelta(days=365)
        for cmd in self.commands:
            for ok in (True, False):
                assert self.apply(reply_to(cmd, ok=ok, retryable=True)).ignored is not None
        for s in self.saga.steps:
            assert self.apply(TimerFired(step_id=s.id), now=self.now + far).ignored is not None
        assert self.apply(SagaDeadlinePassed(), now=self.now + far).ignored is not None
        if self.saga.state is not S.COMPENSATION_FAILED:
            for resolution in Resolution:
                self.resolve(resolution)


COMMON_ACTIONS = [
    "fail_retryable",
    "fail_retryable",
    "fail_final",
    "timeout",
    "timeout",
    "retry_due",
    "retry_due",
    "early_timer",
    "stray_timer",
    "replay",
    "forge",
    "compensate",
    "saga_deadline",
    "resolve",
]
FORWARD_ACTIONS = ["succeed"] * 4 + COMMON_ACTIONS + ["saga_deadline"]
"""While started or completed: success is weighted up to get deep enough to undo something."""
COMPENSATING_ACTIONS = ["succeed"] * 2 + COMMON_ACTIONS + ["resolve"] * 2
"""While compensating or compensation_failed: failures and resolutions matter most."""
NEEDS_IN_FLIGHT = {"succeed", "fail_retryable", "fail_final", "timeout"}

policies_st = st.builds(
    policy,
    st.integers(1, 3),
    initial=st.sampled_from([0.0, 0.5, 2.0]),
    coefficient=st.sampled_from([1.0, 2.0, 3.0]),
    maximum=st.sampled_from([1.0, 5.0]),
)


@st.composite
def failure_specs(draw: st.DrawFn) -> list[StepSpec]:
    n = draw(st.integers(1, 6), label="steps")
    return [
        fspec(
            i,
            compensable=draw(st.booleans()),
            retry=draw(policies_st),
            compensation_retry=draw(policies_st),
            timeout=timedelta(seconds=draw(st.sampled_from([1, 5, 30]))),
        )
        for i in range(n)
    ]


saga_timeout_st = st.one_of(st.none(), st.integers(1, 90).map(lambda s: timedelta(seconds=s)))
late_st = st.integers(-2, 3).map(lambda s: timedelta(seconds=s))


def drive_failures(
    data: st.DataObject, step_specs: list[StepSpec], timeout: timedelta | None, budget: int
) -> FailureRun:
    run = FailureRun(step_specs, timeout)
    for _ in range(budget):
        if run.saga.state in (S.FAILED, S.COMPENSATED):
            break  # check_inert() tries everything on it at the end
        flying = run.in_flight() is not None
        actions = (
            FORWARD_ACTIONS if run.saga.state in (S.STARTED, S.COMPLETED) else COMPENSATING_ACTIONS
        )
        choices = [a for a in actions if flying or a not in NEEDS_IN_FLIGHT]
        if run.retrying_step() is None:
            choices = [a for a in choices if a != "retry_due"]
        if not run.delivered:
            choices = [a for a in choices if a != "replay"]
        action = data.draw(st.sampled_from(choices), label="action")
        if action == "succeed":
            run.answer(True)
        elif action == "fail_retryable":
            run.answer(False, retryable=True)
        elif action == "fail_final":
            run.answer(False)
        elif action == "timeout":
            step = run.active_step()
            assert step is not None
            run.fire(step, max(timedelta(0), data.draw(late_st)))
        elif action == "retry_due":
            step = run.retrying_step()
            assert step is not None
            run.fire(step, max(timedelta(0), data.draw(late_st)))
        elif action == "early_timer":
            run.fire_early()
        elif action == "stray_timer":
            run.stray_timer(data.draw(st.integers(0, 10)), data.draw(late_st) + 2 * SECOND)
        elif action == "replay":
            run.replay(data.draw(st.integers(0, 100)), data.draw(st.booleans()))
        elif action == "forge":
            run.forge(data.draw(st.sampled_from(["token", "attempt", "kind", "step"])))
        elif action == "compensate":
            run.compensate()
        elif action == "saga_deadline":
            run.saga_deadline(data.draw(late_st))
        else:
            run.resolve(data.draw(st.sampled_from(list(Resolution))))
    return run


def drain_failures(run: FailureRun, resolutions: st.DataObject | None) -> None:
    """Answer successfully, let due retries run and, if ``resolutions``, resolve failed
    compensations: the saga must then end within a bounded number of events."""
    for _ in range(6 * run.n + 6):
        step = run.active_step()
        if run.in_flight() is not None:
            run.answer(True)
        elif step is not None:
            run.fire(step)
        elif run.saga.state is S.COMPENSATION_FAILED and resolutions is not None:
            run.resolve(resolutions.draw(st.sampled_from(list(Resolution)), label="resolution"))
        else:
            return
    raise AssertionError(f"saga still {run.saga.state} after draining")


@SETTINGS
@given(
    data=st.data(),
    step_specs=failure_specs(),
    timeout=saga_timeout_st,
    budget=st.integers(0, 30),
)
def test_failure_runs_end_terminal_when_answered_and_resolved(
    data: st.DataObject, step_specs: list[StepSpec], timeout: timedelta | None, budget: int
) -> None:
    run = drive_failures(data, step_specs, timeout, budget)
    drain_failures(run, data)
    run.check_final(resolved=True)
    run.check_inert()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    step_specs=failure_specs(),
    timeout=saga_timeout_st,
    budget=st.integers(0, 30),
)
def test_failure_runs_without_an_operator_end_or_wait_for_one(
    data: st.DataObject, step_specs: list[StepSpec], timeout: timedelta | None, budget: int
) -> None:
    run = drive_failures(data, step_specs, timeout, budget)
    drain_failures(run, None)
    run.check_final(resolved=False)
    run.check_inert()


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    step_specs=failure_specs(),
    timeout=saga_timeout_st,
    budget=st.integers(0, 30),
)
def test_failure_runs_are_deterministic(
    data: st.DataObject, step_specs: list[StepSpec], timeout: timedelta | None, budget: int
) -> None:
    """The same events at the same instants with the same tokens give the same saga."""
    run = drive_failures(data, step_specs, timeout, budget)
    drain_failures(run, data)
    replayed = FailureRun(step_specs, timeout)
    for ev, now in run.events:
        replayed.apply(ev, now=now)
    assert replayed.saga == run.saga
    assert replayed.commands == run.commands
    assert replayed.history == run.history


@settings(max_examples=100, deadline=None)
@given(step_specs=failure_specs(), fail_at=st.integers(0, 5), timeouts=st.booleans())
def test_exhausted_retries_compensate_the_completed_prefix_newest_first(
    step_specs: list[StepSpec], fail_at: int, timeouts: bool
) -> None:
    """Step ``fail_at`` fails every attempt (timing out, or failing retryably): it is tried
    exactly max_attempts times, then what completed (and it, if it timed out) is undone."""
    fail_at %= len(step_specs)
    run = FailureRun(step_specs)
    for _ in range(fail_at):
        run.answer(True)
    target = run.saga.steps[fail_at]
    while run.saga.state is S.STARTED:
        step = run.saga.steps[fail_at]
        if step.status is StepStatus.RETRYING or timeouts:
            run.fire(step)  # the retry is due, or the attempt times out
        else:
            run.answer(False, retryable=True)
    assert run.saga.steps[fail_at].attempts == target.retry.max_attempts
    drain_failures(run, None)
    expected = [p for p in reversed(range(fail_at + int(timeouts))) if run.compensable(p)]
    assert run.comp_order == expected
    assert run.saga.state is (S.COMPENSATED if expected else S.FAILED)
    run.check_final(resolved=True)
