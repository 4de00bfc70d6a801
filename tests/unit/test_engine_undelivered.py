"""The engine's side of undelivered commands: a command the store proved reached no queue
(``undelivered`` on TimerFired, CompensateRequested, SagaDeadlinePassed) needs no undo."""

from __future__ import annotations

from datetime import timedelta

from engine_helpers import Driver, fspec, policy, reply_to

from coordinator.engine import (
    CommandKind,
    CompensateRequested,
    SagaDeadlinePassed,
    SagaState,
    StepStatus,
    TimerFired,
)

S = SagaState
St = StepStatus
WHY = 'command not delivered: no queue is bound to "svc1.do"'
TIMEOUT = timedelta(seconds=10)


def steps(n: int, attempts: int = 2) -> list:
    return [fspec(i, retry=policy(attempts), timeout=TIMEOUT) for i in range(n)]


def test_compensate_records_an_undelivered_step_as_not_run_and_undoes_only_what_ran() -> None:
    d = Driver(steps(3))
    d.apply(reply_to(d.in_flight, output={"ok": 0}))
    t = d.apply(CompensateRequested(reason="stop", undelivered={"id-1": WHY}))
    s1 = d.step(1)
    assert (s1.status, s1.outcome_unknown, s1.token) == (St.FAILED, False, None)
    assert s1.error == f"attempt 1 not run: {WHY}"
    assert d.step(2).status is St.SKIPPED
    # Only the completed step is undone; the undelivered one is not awaited.
    [cmd] = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", CommandKind.COMPENSATE)
    assert ("s1", "step_not_delivered") in [(h.step_name, h.event) for h in t.history]
    d.apply(reply_to(d.in_flight))
    assert d.saga.state is S.COMPENSATED


def test_compensate_without_proof_awaits_the_step_in_flight_as_before() -> None:
    d = Driver(steps(2))
    t = d.apply(CompensateRequested(reason="stop"))
    assert d.saga.state is S.COMPENSATING
    assert d.step(0).status is St.STARTED
    assert t.commands == ()


def test_an_earlier_attempt_of_unknown_outcome_is_still_compensated() -> None:
    d = Driver(steps(1, attempts=3))
    d.fire(0)  # attempt 1 timed out, maybe delivered
    d.fire(0)  # attempt 2 dispatched
    t = d.apply(CompensateRequested(undelivered={"id-0": WHY}))
    s0 = d.step(0)
    assert (s0.status, s0.outcome_unknown) == (St.COMPENSATING, True)  # undone, as before
    [cmd] = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", CommandKind.COMPENSATE)


def test_attempts_timing_out_undelivered_fail_the_step_without_an_undo() -> None:
    d = Driver(steps(1, attempts=2))
    deadline = d.step(0).deadline_at
    assert deadline is not None
    d.apply(TimerFired(step_id="id-0", undelivered=WHY), now=deadline)
    assert d.step(0).status is St.RETRYING
    assert not d.step(0).outcome_unknown
    assert WHY in (d.step(0).error or "")
    d.fire(0)  # attempt 2 dispatched
    deadline = d.step(0).deadline_at
    assert deadline is not None
    t = d.apply(TimerFired(step_id="id-0", undelivered=WHY), now=deadline)
    assert (d.step(0).status, d.step(0).outcome_unknown) == (St.FAILED, False)
    assert d.saga.state is S.FAILED
    assert t.commands == ()


def test_the_saga_deadline_records_undelivered_steps_as_not_run() -> None:
    d = Driver(steps(1), timeout=timedelta(seconds=5))
    deadline = d.saga.deadline_at
    assert deadline is not None
    d.apply(SagaDeadlinePassed(undelivered={"id-0": WHY}), now=deadline)
    assert d.step(0).status is St.FAILED
    assert d.saga.state is S.COMPENSATED
