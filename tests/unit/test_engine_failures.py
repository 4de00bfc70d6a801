"""Example-based tests of the engine's failure semantics: retries, timeouts, compensation
retries, operator resolution and the saga deadline (coordinator/engine/transitions.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from engine_helpers import T0, Driver, at, fspec, policy, reply_to

from coordinator.engine import (
    DEFAULT_COMPENSATION_RETRY,
    CommandKind,
    CompensateRequested,
    CompensationResolved,
    Resolution,
    RetryPolicy,
    SagaDeadlinePassed,
    SagaState,
    StepStatus,
    TimerFired,
    WrongState,
    apply,
    backoff,
)

S = SagaState
St = StepStatus
EXEC = CommandKind.EXECUTE
COMP = CommandKind.COMPENSATE
TIMEOUT = timedelta(seconds=10)
RETRY3 = policy(3, initial=1, coefficient=2, maximum=60)


def steps(*compensable: bool, retry: RetryPolicy = RETRY3, comp: RetryPolicy = RETRY3) -> list:
    """Specs with 3-attempt policies and a 10 s timeout; the flag says compensable."""
    return [
        fspec(i, compensable=c, retry=retry, compensation_retry=comp, timeout=TIMEOUT)
        for i, c in enumerate(compensable)
    ]


def statuses(d: Driver) -> list[StepStatus]:
    return [s.status for s in d.saga.steps]


def events(t: object) -> list[tuple[str | None, str]]:
    return [(h.step_name, h.event) for h in t.history]  # type: ignore[attr-defined]


def run_forward(d: Driver, n: int) -> None:
    for _ in range(n):
        cmd = d.in_flight
        assert cmd.kind is EXEC
        d.succeed({"made": cmd.step_name})


def assert_ignored(d: Driver, event: object) -> None:
    before = d.saga
    t = d.apply(event)  # type: ignore[arg-type]
    assert t.ignored, event
    assert t.saga is before
    assert (t.commands, t.history) == ((), ())


def exhaust_compensation(d: Driver, *, retryable: bool = True) -> None:
    """Fail the compensation in flight until the saga is compensation_failed."""
    while d.saga.state is S.COMPENSATING:
        cmd = d.in_flight
        assert cmd.kind is COMP
        d.fail("undo broke", retryable=retryable)
        step = d.saga.step_by_id(cmd.step_id)
        assert step is not None
        if step.status is St.COMPENSATION_RETRYING:
            d.fire(step.position)
    assert d.saga.state is S.COMPENSATION_FAILED


# --- forward retries -------------------------------------------------------------------------


def test_retryable_failure_schedules_a_retry_after_a_jittered_backoff() -> None:
    d = Driver(steps(True, True))
    first = d.in_flight
    t = d.apply(reply_to(first, ok=False, error="busy", retryable=True), now=at(5))
    assert t.ignored is None
    assert t.commands == ()
    assert d.saga.state is S.STARTED
    s0 = d.step(0)
    assert s0.status is St.RETRYING
    assert s0.attempts == 1
    assert s0.error == "busy"
    assert s0.token is None
    assert s0.outcome_unknown is False
    assert s0.executed_at is None
    wait = backoff(RETRY3, "id-0", EXEC, 1)
    assert timedelta(0) <= wait <= timedelta(seconds=1)  # cap of attempt 1: initial_interval
    assert s0.deadline_at == at(5) + wait
    assert statuses(d) == [St.RETRYING, St.PENDING]
    ((h),) = t.history
    assert (h.from_state, h.to_state, h.step_name, h.event) == (
        S.STARTED,
        S.STARTED,
        "s0",
        "step_attempt_failed",
    )
    assert h.reason == f"busy (attempt 1; retry in {wait.total_seconds():.3f}s)"


def test_timer_after_the_retry_is_due_dispatches_the_next_attempt() -> None:
    d = Driver(steps(True, True))
    first = d.in_flight
    d.fail("busy", retryable=True)
    due = d.step(0).deadline_at
    assert due is not None
    fired_at = due + timedelta(seconds=3)
    t = d.apply(TimerFired(step_id="id-0"), now=fired_at)
    assert t.ignored is None
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.action, cmd.attempt) == ("id-0", EXEC, "svc0.do", 2)
    assert (cmd.input, cmd.output, cmd.context) == ({"n": 0}, None, {"customer": "c1"})
    assert cmd.token != first.token
    s0 = d.step(0)
    assert s0.status is St.STARTED
    assert s0.attempts == 2
    assert s0.token == cmd.token
    assert s0.deadline_at == fired_at + TIMEOUT
    assert s0.error == "busy"  # the last error stays until the step's outcome changes it
    assert [(h.step_name, h.event, h.reason) for h in t.history] == [
        ("s0", "step_dispatched", "attempt 2")
    ]

    d.succeed({"ok": 2})
    assert d.step(0).status is St.COMPLETED
    assert d.step(0).output == {"ok": 2}
    assert d.step(0).deadline_at is None
    assert d.in_flight.step_id == "id-1"


def test_timer_exactly_at_the_deadline_fires() -> None:
    d = Driver(steps(True))
    d.fail(retryable=True)
    t = d.fire(0)
    assert t.ignored is None
    assert d.step(0).status is St.STARTED


@pytest.mark.parametrize("status", [St.RETRYING, St.STARTED])
def test_timer_before_the_deadline_is_ignored(status: StepStatus) -> None:
    d = Driver(steps(True))
    if status is St.RETRYING:
        d.fail(retryable=True)
    assert d.step(0).status is status
    before = d.saga
    t = d.fire_early(0)
    assert t.ignored
    assert t.saga is before
    assert (t.commands, t.history) == ((), ())


def test_timer_for_unknown_step_or_step_without_deadline_is_ignored() -> None:
    d = Driver(steps(True, True))
    assert_ignored(d, TimerFired(step_id="no-such-step"))
    assert_ignored(d, TimerFired(step_id="id-1"))  # pending: no deadline
    d.succeed()
    assert_ignored(d, TimerFired(step_id="id-0"))  # completed: no deadline


def test_attempts_stop_at_max_attempts_and_the_saga_fails_with_nothing_to_undo() -> None:
    d = Driver(steps(True, True))
    for attempt in (1, 2):
        assert d.in_flight.attempt == attempt
        d.fail(f"busy {attempt}", retryable=True)
        assert d.step(0).status is St.RETRYING
        d.fire(0)
    assert d.in_flight.attempt == 3
    t = d.fail("busy 3", retryable=True)
    assert t.commands == ()
    s0 = d.step(0)
    assert s0.status is St.FAILED
    assert s0.attempts == 3
    assert s0.error == "busy 3"
    assert s0.deadline_at is None
    assert s0.outcome_unknown is False
    assert d.saga.state is S.FAILED
    assert statuses(d) == [St.FAILED, St.SKIPPED]
    assert events(t) == [("s0", "step_failed"), (None, "saga_failed")]
    assert_ignored(d, TimerFired(step_id="id-0"))


def test_attempts_exhausted_compensates_completed_steps() -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 1)
    for _ in range(2):
        d.fail(retryable=True)
        d.fire(1)
    t = d.fail("still busy", retryable=True)
    assert d.step(1).attempts == 3
    assert d.step(1).status is St.FAILED
    assert d.saga.state is S.COMPENSATING
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.output) == ("id-0", COMP, {"made": "s0"})
    assert events(t) == [
        ("s1", "step_failed"),
        ("s1", "compensation_started"),
        ("s0", "compensation_dispatched"),
    ]
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.FAILED, St.SKIPPED]


def test_max_attempts_one_means_no_retry() -> None:
    d = Driver(steps(True, retry=policy(1)))
    d.fail(retryable=True)
    assert d.step(0).status is St.FAILED
    assert d.saga.state is S.FAILED


@pytest.mark.parametrize("completed_before", [0, 1])
def test_non_retryable_failure_gives_up_at_once_with_attempts_left(completed_before: int) -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, completed_before)
    t = d.fail("card declined", retryable=False)
    step = d.step(completed_before)
    assert step.attempts == 1 < RETRY3.max_attempts
    assert step.status is St.FAILED
    assert step.deadline_at is None
    if completed_before:
        assert d.saga.state is S.COMPENSATING
        (cmd,) = t.commands
        assert (cmd.step_id, cmd.kind) == ("id-0", COMP)
    else:
        assert d.saga.state is S.FAILED
        assert t.commands == ()


def test_non_retryable_failure_after_retries_gives_up() -> None:
    d = Driver(steps(True))
    d.fail(retryable=True)
    d.fire(0)
    d.fail("fatal", retryable=False)
    assert (d.step(0).status, d.step(0).attempts, d.saga.state) == (St.FAILED, 2, S.FAILED)


# --- timeouts --------------------------------------------------------------------------------


def test_timeout_is_a_retryable_failure_whose_outcome_is_unknown() -> None:
    d = Driver(steps(True, True))
    first = d.in_flight
    assert d.step(0).deadline_at == T0 + TIMEOUT
    t = d.fire(0)
    assert t.ignored is None
    assert t.commands == ()
    s0 = d.step(0)
    assert s0.status is St.RETRYING
    assert s0.outcome_unknown is True
    assert s0.token is None
    assert s0.error == "attempt 1 timed out after 10s"
    assert s0.deadline_at == T0 + TIMEOUT + backoff(RETRY3, "id-0", EXEC, 1)
    assert d.saga.state is S.STARTED
    assert events(t) == [("s0", "step_attempt_failed")]
    # The attempt is said once: the timeout's text names it already.
    wait = backoff(RETRY3, "id-0", EXEC, 1).total_seconds()
    assert t.history[0].reason == f"attempt 1 timed out after 10s (retry in {wait:.3f}s)"

    t = d.fire(0)
    (cmd,) = t.commands
    assert cmd.attempt == 2
    assert cmd.token != first.token
    assert d.step(0).outcome_unknown is True  # still unknown while attempt 2 runs
    d.succeed()
    assert d.step(0).status is St.COMPLETED
    assert d.step(0).outcome_unknown is False


def test_every_command_carries_the_deadline_its_timer_acts_on() -> None:
    # Executions, retries and compensations alike: the participant ends its work at the
    # same instant the coordinator times the attempt out.
    d = Driver(steps(True, True))
    first = d.in_flight
    assert (first.deadline_at, first.timeout) == (T0 + TIMEOUT, TIMEOUT)
    d.fire(0)
    d.fire(0)
    retry = d.in_flight
    assert retry.attempt == 2
    assert retry.deadline_at == d.step(0).deadline_at == d.now + TIMEOUT
    d.succeed()
    d.fail("no", retryable=False)
    undo = d.in_flight
    assert undo.kind is COMP
    assert (undo.deadline_at, undo.timeout) == (d.step(0).deadline_at, TIMEOUT)
    assert undo.deadline_at == d.now + TIMEOUT


def test_a_reply_after_the_deadline_but_before_the_timer_still_counts() -> None:
    d = Driver(steps(True, True))
    cmd = d.in_flight
    d.apply(reply_to(cmd), now=T0 + TIMEOUT + timedelta(seconds=5))
    assert d.step(0).status is St.COMPLETED
    assert_ignored(d, TimerFired(step_id="id-0"))


@pytest.mark.parametrize("ok", [True, False])
def test_late_reply_of_attempt_1_after_attempt_2_was_dispatched_is_ignored(ok: bool) -> None:
    d = Driver(steps(True, True))
    first = d.in_flight
    d.fire(0)  # attempt 1 times out
    d.fire(0)  # attempt 2 is sent
    second = d.in_flight
    assert second.attempt == 2
    assert_ignored(d, reply_to(first, ok=ok))
    # Fencing holds on attempt and token separately.
    assert_ignored(d, reply_to(first, ok=ok, token=second.token))
    assert_ignored(d, reply_to(first, ok=ok, attempt=2))
    d.succeed()
    assert d.step(0).status is St.COMPLETED


@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize("cause", ["timeout", "failure"])
def test_reply_while_retrying_is_ignored(ok: bool, cause: str) -> None:
    d = Driver(steps(True, True))
    first = d.in_flight
    if cause == "timeout":
        d.fire(0)
    else:
        d.fail(retryable=True)
    assert d.step(0).status is St.RETRYING
    assert_ignored(d, reply_to(first, ok=ok))
    assert_ignored(d, reply_to(first, ok=ok, attempt=2))


def test_step_that_timed_out_on_its_last_attempt_is_compensated() -> None:
    d = Driver(steps(True, True, True, retry=policy(2)))
    run_forward(d, 1)
    d.fail("busy", retryable=True)  # attempt 1 fails with a reply
    d.fire(1)
    t = d.fire(1)  # attempt 2 (the last) times out
    s1 = d.step(1)
    # It failed, and in the same transition its compensation was sent.
    assert s1.status is St.COMPENSATING
    assert s1.outcome_unknown is True
    assert s1.attempts == 2
    assert s1.error == "attempt 2 timed out after 10s"
    assert s1.executed_at == d.now
    assert d.saga.state is S.COMPENSATING
    (cmd,) = t.commands
    # Newest first: the step whose outcome is unknown, with no output to hand over.
    assert (cmd.step_id, cmd.kind, cmd.action, cmd.output) == ("id-1", COMP, "svc1.undo", None)
    assert events(t) == [
        ("s1", "step_failed"),
        ("s1", "compensation_started"),
        ("s1", "compensation_dispatched"),
    ]
    d.succeed()
    assert d.in_flight.step_id == "id-0"
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.SKIPPED]


def test_first_step_timing_out_on_its_only_attempt_is_compensated_not_failed() -> None:
    d = Driver(steps(True, True, retry=policy(1)))
    t = d.fire(0)
    assert d.saga.state is S.COMPENSATING
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)
    d.succeed()
    assert d.saga.state is S.COMPENSATED


def test_timed_out_step_without_compensation_is_not_compensated() -> None:
    d = Driver(steps(True, False, retry=policy(1)))
    run_forward(d, 1)
    t = d.fire(1)
    assert d.step(1).outcome_unknown is True
    (cmd,) = t.commands
    assert cmd.step_id == "id-0"
    d.succeed()
    assert statuses(d) == [St.COMPENSATED, St.FAILED]
    assert d.saga.state is S.COMPENSATED


def test_timed_out_only_step_without_compensation_fails_the_saga() -> None:
    d = Driver(steps(False, True, retry=policy(1)))
    t = d.fire(0)
    assert t.commands == ()
    assert d.saga.state is S.FAILED


def test_step_that_failed_with_a_reply_on_its_last_attempt_is_not_compensated() -> None:
    d = Driver(steps(True, True, True, retry=policy(2)))
    run_forward(d, 1)
    d.fail(retryable=True)
    d.fire(1)
    t = d.fail("refused", retryable=True)
    s1 = d.step(1)
    assert (s1.status, s1.outcome_unknown) == (St.FAILED, False)
    (cmd,) = t.commands
    assert cmd.step_id == "id-0"
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.FAILED, St.SKIPPED]
    assert d.step(1).compensation_attempts == 0


# --- Compensate / deadline while a step runs or retries --------------------------------------


def test_compensate_while_retrying_cancels_the_retry_and_compensates_what_completed() -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 1)
    d.fail("busy", retryable=True)
    retry_due = d.step(1).deadline_at
    assert retry_due is not None
    t = d.apply(CompensateRequested(reason="cancelled"))
    s1 = d.step(1)
    assert s1.status is St.FAILED
    assert s1.deadline_at is None
    assert s1.outcome_unknown is False
    assert d.saga.state is S.COMPENSATING
    assert statuses(d) == [St.COMPENSATING, St.FAILED, St.SKIPPED]
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)
    assert [(h.from_state, h.to_state, h.step_name, h.event, h.reason) for h in t.history] == [
        (S.STARTED, S.STARTED, "s1", "step_failed", "retry cancelled: the saga compensates"),
        (S.STARTED, S.COMPENSATING, None, "compensation_requested", "cancelled"),
        (S.COMPENSATING, S.COMPENSATING, "s0", "compensation_dispatched", None),
    ]
    # The cancelled retry's timer no longer does anything.
    before = d.saga
    t = d.apply(TimerFired(step_id="id-1"), now=retry_due + timedelta(seconds=1))
    assert t.ignored
    assert t.saga is before
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert d.step(1).attempts == 1


def test_compensate_while_retrying_a_timed_out_step_compensates_it_first() -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 1)
    d.fire(1)  # timed out: outcome unknown, retry scheduled
    t = d.apply(CompensateRequested())
    assert events(t) == [
        ("s1", "step_failed"),
        (None, "compensation_requested"),
        ("s1", "compensation_dispatched"),
    ]
    assert d.step(1).status is St.COMPENSATING
    assert d.step(1).outcome_unknown is True
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-1", COMP)
    d.succeed()
    d.succeed()
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.SKIPPED]
    assert d.saga.state is S.COMPENSATED


def test_compensate_while_retrying_with_nothing_to_undo_ends_compensated() -> None:
    d = Driver(steps(True, True))
    d.fail(retryable=True)
    t = d.apply(CompensateRequested())
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.FAILED, St.SKIPPED]


def test_in_flight_step_that_fails_retryably_while_compensating_is_not_retried() -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 1)
    in_flight = d.in_flight
    d.apply(CompensateRequested())
    t = d.apply(reply_to(in_flight, ok=False, error="busy", retryable=True))
    s1 = d.step(1)
    assert (s1.status, s1.attempts, s1.outcome_unknown) == (St.FAILED, 1, False)
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)


def test_in_flight_step_that_times_out_while_compensating_is_compensated_first() -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 1)
    d.apply(CompensateRequested())
    t = d.fire(1)
    s1 = d.step(1)
    # Not retried (the saga compensates), failed, and compensated at once.
    assert events(t) == [("s1", "step_failed"), ("s1", "compensation_dispatched")]
    assert (s1.status, s1.attempts, s1.outcome_unknown) == (St.COMPENSATING, 1, True)
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-1", COMP)
    d.succeed()
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.SKIPPED]


# --- compensation retries --------------------------------------------------------------------


def test_retryable_compensation_failure_schedules_a_compensation_retry() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    first = d.in_flight
    assert (first.step_id, first.kind, first.attempt) == ("id-0", COMP, 1)
    t = d.apply(reply_to(first, ok=False, error="undo busy", retryable=True), now=at(50))
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATING
    s0 = d.step(0)
    assert s0.status is St.COMPENSATION_RETRYING
    assert s0.compensation_attempts == 1
    assert s0.error == "undo busy"
    assert s0.token is None
    assert s0.deadline_at == at(50) + backoff(RETRY3, "id-0", COMP, 1)
    assert events(t) == [("s0", "compensation_attempt_failed")]
    assert "attempt 1" in (t.history[0].reason or "")

    # The next attempt is due only at deadline_at; before that, the timer does nothing.
    assert d.fire_early(0).ignored
    assert_ignored(d, reply_to(first))  # no compensation reply is awaited while retrying
    t = d.fire(0)
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.action, cmd.attempt) == ("id-0", COMP, "svc0.undo", 2)
    assert cmd.output == {"made": "s0"}
    assert cmd.token != first.token
    assert d.step(0).status is St.COMPENSATING
    assert d.step(0).compensation_attempts == 2
    assert d.step(0).deadline_at == d.now + TIMEOUT
    assert [(h.step_name, h.event, h.reason) for h in t.history] == [
        ("s0", "compensation_dispatched", "attempt 2")
    ]
    assert_ignored(d, reply_to(first))  # attempt 1's late reply is fenced off


def test_compensation_failing_three_times_then_succeeding_ends_compensated() -> None:
    d = Driver(steps(True, True, comp=DEFAULT_COMPENSATION_RETRY))
    run_forward(d, 1)
    d.fail()
    for _ in range(3):
        d.fail("undo busy", retryable=True)
        assert d.step(0).status is St.COMPENSATION_RETRYING
        assert d.saga.state is S.COMPENSATING
        d.fire(0)
    assert d.in_flight.attempt == 4
    d.succeed()
    s0 = d.step(0)
    assert s0.status is St.COMPENSATED
    assert s0.compensation_attempts == 4
    assert s0.compensated_at == d.now
    assert s0.deadline_at is None
    assert d.saga.state is S.COMPENSATED
    hist = [e for _, _, _, e in d.history()]
    assert hist.count("compensation_attempt_failed") == 3
    assert hist.count("compensation_dispatched") == 4
    assert hist[-2:] == ["step_compensated", "saga_compensated"]


def test_compensation_timeout_is_retried() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    t = d.fire(0)
    s0 = d.step(0)
    assert s0.status is St.COMPENSATION_RETRYING
    assert s0.error == "compensation attempt 1 timed out after 10s"
    assert events(t) == [("s0", "compensation_attempt_failed")]
    assert (t.history[0].reason or "").startswith(s0.error + " (retry in ")
    d.fire(0)
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert d.step(0).compensation_attempts == 2


@pytest.mark.parametrize("how", ["failure", "timeout"])
def test_compensation_exhausting_its_attempts_is_compensation_failed(how: str) -> None:
    d = Driver(steps(True, True, True))
    run_forward(d, 2)
    d.fail()
    seen_states = []
    for attempt in (1, 2, 3):
        cmd = d.in_flight
        assert (cmd.step_id, cmd.attempt) == ("id-1", attempt)
        t = d.fire(1) if how == "timeout" else d.fail("undo broke", retryable=True)
        seen_states.append(d.saga.state)
        if attempt < 3:
            d.fire(1)
    assert seen_states == [S.COMPENSATING, S.COMPENSATING, S.COMPENSATION_FAILED]
    assert t.commands == ()
    s1 = d.step(1)
    assert s1.status is St.COMPENSATION_FAILED
    assert s1.compensation_attempts == 3
    assert s1.deadline_at is None
    assert s1.token is None
    assert s1.compensated_at is None
    assert d.saga.completed_at is None
    assert statuses(d) == [St.COMPLETED, St.COMPENSATION_FAILED, St.FAILED]
    assert events(t) == [("s1", "compensation_failed"), ("s1", "saga_compensation_failed")]
    assert t.history[-1].to_state is S.COMPENSATION_FAILED
    assert S.COMPENSATED not in {h[1] for h in d.history()}

    # Nothing happens on its own any more.
    last = d.commands[-1]
    assert_ignored(d, TimerFired(step_id="id-1"))
    assert_ignored(d, TimerFired(step_id="id-0"))
    assert_ignored(d, reply_to(last))
    assert_ignored(d, reply_to(last, ok=False, retryable=True))
    assert_ignored(d, SagaDeadlinePassed())
    with pytest.raises(WrongState):
        apply(d.saga, CompensateRequested(), now=at(999), new_token=d.tokens)
    assert d.saga.state is S.COMPENSATION_FAILED


def test_non_retryable_compensation_failure_is_compensation_failed_at_once() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    d.fail("gone", retryable=False)
    assert d.step(0).compensation_attempts == 1
    assert d.step(0).status is St.COMPENSATION_FAILED
    assert d.saga.state is S.COMPENSATION_FAILED


# --- operator resolution ---------------------------------------------------------------------


def compensation_failed_saga() -> Driver:
    """s0, s1 completed; s2 failed; s1's compensation exhausted its 3 attempts."""
    d = Driver(steps(True, True, True))
    run_forward(d, 2)
    d.fail()
    exhaust_compensation(d)
    assert d.step(1).status is St.COMPENSATION_FAILED
    assert d.step(1).compensation_attempts == 3
    return d


def test_resolve_retry_dispatches_one_more_compensation_attempt() -> None:
    d = compensation_failed_saga()
    t = d.apply(CompensationResolved(resolution=Resolution.RETRY, reason="db back up"))
    assert d.saga.state is S.COMPENSATING
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.attempt, cmd.output) == ("id-1", COMP, 4, {"made": "s1"})
    s1 = d.step(1)
    assert s1.status is St.COMPENSATING
    assert s1.compensation_attempts == 4
    assert s1.token == cmd.token
    assert s1.deadline_at == d.now + TIMEOUT
    assert [(h.from_state, h.to_state, h.step_name, h.event, h.reason) for h in t.history] == [
        (S.COMPENSATION_FAILED, S.COMPENSATING, "s1", "compensation_resolved_retry", "db back up"),
        (S.COMPENSATING, S.COMPENSATING, "s1", "compensation_dispatched", "attempt 4"),
    ]
    d.succeed()
    assert d.step(1).status is St.COMPENSATED
    assert d.in_flight.step_id == "id-0"  # carries on with the older step
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.FAILED]


@pytest.mark.parametrize("how", ["retryable failure", "timeout", "non-retryable failure"])
def test_resolve_retry_that_fails_again_returns_to_compensation_failed(how: str) -> None:
    d = compensation_failed_saga()
    d.apply(CompensationResolved(resolution=Resolution.RETRY, reason="try again"))
    if how == "timeout":
        t = d.fire(1)
    else:
        t = d.fail("still broken", retryable=how == "retryable failure")
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATION_FAILED
    assert d.step(1).status is St.COMPENSATION_FAILED
    assert d.step(1).deadline_at is None
    assert d.step(1).compensation_attempts == 4
    # It can be resolved again.
    d.apply(CompensationResolved(resolution=Resolution.RETRY, reason="again"))
    assert d.in_flight.attempt == 5


def test_resolve_retry_of_a_non_retryable_failure_with_attempts_left_retries_again() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    d.fail("gone", retryable=False)  # compensation attempt 1 of 3
    d.apply(CompensationResolved(resolution=Resolution.RETRY, reason="r"))
    d.fail("busy", retryable=True)  # attempt 2 of 3: retries are left
    assert d.step(0).status is St.COMPENSATION_RETRYING
    assert d.saga.state is S.COMPENSATING


def test_resolve_mark_compensated_carries_on_with_older_steps() -> None:
    d = compensation_failed_saga()
    t = d.apply(
        CompensationResolved(resolution=Resolution.MARK_COMPENSATED, reason="refunded by hand")
    )
    s1 = d.step(1)
    assert s1.status is St.COMPENSATED
    assert s1.compensated_at == d.now
    assert s1.compensation_attempts == 3
    assert s1.token is None
    assert s1.deadline_at is None
    assert d.saga.state is S.COMPENSATING
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.attempt) == ("id-0", COMP, 1)
    hist = [(h.from_state, h.to_state, h.step_name, h.event, h.reason) for h in t.history]
    assert hist[0] == (
        S.COMPENSATION_FAILED,
        S.COMPENSATING,
        "s1",
        "compensation_resolved_mark_compensated",
        "refunded by hand",
    )
    assert hist[-1][2:4] == ("s0", "compensation_dispatched")
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert d.saga.completed_at == d.now
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.FAILED]


def test_resolve_mark_compensated_of_the_oldest_step_ends_compensated() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    d.fail("gone")
    t = d.apply(CompensationResolved(resolution=Resolution.MARK_COMPENSATED, reason="manual"))
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATED
    assert events(t) == [
        ("s0", "compensation_resolved_mark_compensated"),
        (None, "saga_compensated"),
    ]


@pytest.mark.parametrize("resolution", list(Resolution))
@pytest.mark.parametrize(
    "target", [S.STARTED, S.COMPLETED, S.COMPENSATING, S.COMPENSATED, S.FAILED]
)
def test_resolving_a_saga_whose_compensation_did_not_fail_is_illegal(
    resolution: Resolution, target: SagaState
) -> None:
    d = Driver(steps(True, True))
    if target is S.FAILED:
        d.fail()
    elif target is not S.STARTED:
        run_forward(d, 1)
        if target is S.COMPLETED:
            d.succeed()
        else:
            d.fail()
            if target is S.COMPENSATED:
                d.succeed()
    assert d.saga.state is target
    before = d.saga
    with pytest.raises(WrongState):
        apply(
            before,
            CompensationResolved(resolution=resolution, reason="x"),
            now=at(999),
            new_token=d.tokens,
        )
    assert d.saga is before


# --- saga deadline ---------------------------------------------------------------------------


def test_start_with_timeout_sets_the_saga_deadline() -> None:
    assert Driver(steps(True), timeout=timedelta(minutes=5)).saga.deadline_at == T0 + timedelta(
        minutes=5
    )
    assert Driver(steps(True)).saga.deadline_at is None


def test_saga_deadline_before_it_passed_is_ignored() -> None:
    d = Driver(steps(True, True), timeout=timedelta(seconds=60))
    before = d.saga
    t = d.apply(SagaDeadlinePassed(), now=T0 + timedelta(seconds=59))
    assert t.ignored
    assert t.saga is before


def test_saga_deadline_without_a_deadline_is_ignored() -> None:
    d = Driver(steps(True, True))
    assert d.apply(SagaDeadlinePassed(), now=at(10**6)).ignored


def test_saga_deadline_compensates_a_started_saga() -> None:
    d = Driver(steps(True, True, True), timeout=timedelta(seconds=60))
    run_forward(d, 1)
    in_flight = d.in_flight
    deadline = T0 + timedelta(seconds=60)
    t = d.apply(SagaDeadlinePassed(), now=deadline)
    assert t.ignored is None
    assert d.saga.state is S.COMPENSATING
    assert d.saga.deadline_at is None
    assert t.commands == ()  # the step in flight is waited for
    assert statuses(d) == [St.COMPLETED, St.STARTED, St.SKIPPED]
    assert [(h.from_state, h.to_state, h.event, h.reason) for h in t.history] == [
        (S.STARTED, S.COMPENSATING, "saga_deadline_passed", "deadline passed")
    ]
    t = d.apply(reply_to(in_flight))
    assert [c.step_id for c in t.commands] == ["id-1"]
    d.succeed()
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    # Once compensating, the deadline does not apply again.
    assert_ignored(d, SagaDeadlinePassed())


def test_saga_deadline_cancels_a_pending_retry() -> None:
    d = Driver(steps(True, True), timeout=timedelta(seconds=60))
    run_forward(d, 1)
    d.fail(retryable=True)
    t = d.apply(SagaDeadlinePassed(), now=T0 + timedelta(seconds=61))
    assert d.step(1).status is St.FAILED
    assert events(t)[:2] == [("s1", "step_failed"), (None, "saga_deadline_passed")]
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)


def test_saga_deadline_is_ignored_once_completed() -> None:
    d = Driver(steps(True, True), timeout=timedelta(seconds=60))
    run_forward(d, 2)
    assert d.saga.state is S.COMPLETED
    assert d.saga.deadline_at is None
    before = d.saga
    t = d.apply(SagaDeadlinePassed(), now=T0 + timedelta(hours=1))
    assert t.ignored
    assert t.saga is before


def test_saga_deadline_is_ignored_while_compensating_after_a_failure() -> None:
    d = Driver(steps(True, True, True), timeout=timedelta(seconds=60))
    run_forward(d, 2)
    d.fail()
    assert d.saga.state is S.COMPENSATING
    before = d.saga
    t = d.apply(SagaDeadlinePassed(), now=T0 + timedelta(hours=1))
    assert t.ignored
    assert t.saga is before


# --- backoff ---------------------------------------------------------------------------------


def cap(p: RetryPolicy, attempt: int) -> float:
    return min(
        p.max_interval.total_seconds(),
        p.initial_interval.total_seconds() * p.backoff_coefficient ** (attempt - 1),
    )


def test_backoff_is_deterministic() -> None:
    p = policy(10, initial=0.5, coefficient=3, maximum=100)
    for attempt in range(1, 8):
        for kind in CommandKind:
            assert backoff(p, "id-x", kind, attempt) == backoff(p, "id-x", kind, attempt)
    assert backoff(p, "id-x", EXEC, 3) == backoff(
        policy(10, initial=0.5, coefficient=3, maximum=100), "id-x", EXEC, 3
    )


@pytest.mark.parametrize(
    "p",
    [
        policy(20, initial=1, coefficient=2, maximum=60),
        policy(20, initial=0.25, coefficient=3, maximum=30),
        policy(20, initial=5, coefficient=1, maximum=60),
        policy(20, initial=2, coefficient=1.5, maximum=2),
    ],
)
def test_backoff_stays_within_zero_and_the_exponential_cap(p: RetryPolicy) -> None:
    for attempt in range(1, 21):
        bound = timedelta(seconds=cap(p, attempt))
        for n in range(40):
            for kind in CommandKind:
                wait = backoff(p, f"step-{n}", kind, attempt)
                assert timedelta(0) <= wait <= bound, (attempt, n, kind, wait, bound)


def test_backoff_cap_grows_exponentially_until_max_interval() -> None:
    p = policy(20, initial=1, coefficient=2, maximum=60)
    ids = [f"step-{n}" for n in range(200)]
    largest = [max(backoff(p, i, EXEC, attempt) for i in ids) for attempt in range(1, 10)]
    caps = [cap(p, attempt) for attempt in range(1, 10)]
    assert caps == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for got, c in zip(largest, caps, strict=True):
        # 200 uniform draws: the largest is within 5% of the cap (fixed hashes, not chance).
        assert 0.95 * c <= got.total_seconds() <= c
    assert largest[5] > timedelta(seconds=16)  # attempt 6 waits longer than attempt 5 could


def test_backoff_differs_across_steps_kinds_and_attempts() -> None:
    p = policy(10, initial=10, coefficient=1, maximum=10)  # same cap for every attempt
    waits = {backoff(p, f"step-{n}", EXEC, 1) for n in range(100)}
    assert len(waits) == 100
    spread = sorted(w.total_seconds() for w in waits)
    assert spread[0] < 1 and spread[-1] > 9  # spread over the whole [0, cap] range
    assert backoff(p, "step-0", EXEC, 1) != backoff(p, "step-0", COMP, 1)
    assert backoff(p, "step-0", EXEC, 1) != backoff(p, "step-0", EXEC, 2)


def test_backoff_with_zero_initial_interval_is_zero() -> None:
    p = policy(5, initial=0, coefficient=2, maximum=10)
    assert all(backoff(p, "s", EXEC, a) == timedelta(0) for a in range(1, 6))


def test_backoff_of_a_very_late_attempt_is_capped_not_an_overflow() -> None:
    p = policy(2000, initial=1, coefficient=2, maximum=60)
    assert timedelta(0) <= backoff(p, "step-0", EXEC, 1100) <= timedelta(seconds=60)


def test_compensation_timeout_does_not_make_the_actions_outcome_unknown() -> None:
    d = Driver(steps(True, True))
    run_forward(d, 1)
    d.fail()
    d.fire(0)  # compensation attempt 1 times out
    assert d.step(0).status is St.COMPENSATION_RETRYING
    assert d.step(0).outcome_unknown is False
