"""Example-based tests of the pure saga state machine (coordinator/engine/transitions.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from engine_helpers import T0, Driver, Tokens, at, reply_to, spec, specs, start_saga

from coordinator.engine import (
    CommandKind,
    CompensateRequested,
    SagaState,
    StepReplied,
    StepStatus,
    WrongState,
    apply,
    start,
)

S = SagaState
St = StepStatus
EXEC = CommandKind.EXECUTE
COMP = CommandKind.COMPENSATE


def statuses(d: Driver) -> list[StepStatus]:
    return [s.status for s in d.saga.steps]


def run_forward(d: Driver, n: int) -> None:
    """Succeed ``n`` execute commands, each with an output naming its step."""
    for _ in range(n):
        cmd = d.in_flight
        assert cmd.kind is EXEC
        d.succeed({"made": cmd.step_name})


# --- start -----------------------------------------------------------------------------------


def test_start_builds_saga_and_dispatches_only_the_first_step() -> None:
    tokens = Tokens()
    t = start_saga(specs(True, False, True), tokens=tokens, idempotency_key="k1")
    saga = t.saga
    assert saga.id == "saga-1"
    assert saga.name == "order.place"
    assert saga.state is S.STARTED
    assert saga.context == {"customer": "c1"}
    assert saga.idempotency_key == "k1"
    assert saga.created_at == saga.updated_at == T0
    assert saga.completed_at is None
    assert [s.id for s in saga.steps] == ["id-0", "id-1", "id-2"]
    assert [s.position for s in saga.steps] == [0, 1, 2]
    assert [s.compensation for s in saga.steps] == ["svc0.undo", None, "svc2.undo"]
    assert statuses_of(saga) == [St.STARTED, St.PENDING, St.PENDING]
    assert [s.attempts for s in saga.steps] == [1, 0, 0]
    assert saga.steps[0].token == "tok-1"
    assert [s.token for s in saga.steps[1:]] == [None, None]

    (cmd,) = t.commands
    assert cmd.saga_id == "saga-1"
    assert cmd.saga_name == "order.place"
    assert cmd.step_id == "id-0"
    assert cmd.step_name == "s0"
    assert cmd.kind is EXEC
    assert cmd.action == "svc0.do"
    assert cmd.attempt == 1
    assert cmd.input == {"n": 0}
    assert cmd.output is None
    assert cmd.context == {"customer": "c1"}
    assert cmd.token == "tok-1"
    assert tokens.issued == ["tok-1"]

    assert [(h.from_state, h.to_state, h.step_name, h.event) for h in t.history] == [
        (None, S.STARTED, None, "saga_started"),
        (S.STARTED, S.STARTED, "s0", "step_dispatched"),
    ]
    assert t.ignored is None


def statuses_of(saga: object) -> list[StepStatus]:
    return [s.status for s in saga.steps]  # type: ignore[attr-defined]


def test_start_rejects_no_steps() -> None:
    with pytest.raises(ValueError):
        start_saga([])


def test_start_rejects_mismatched_step_ids() -> None:
    with pytest.raises(ValueError):
        start(
            saga_id="x",
            name="n",
            steps=specs(True, True),
            step_ids=["only-one"],
            context={},
            idempotency_key=None,
            now=T0,
            new_token=Tokens(),
        )


def test_start_normalises_empty_compensation_to_none() -> None:
    t = start_saga([replace(spec(0), compensation="")])
    assert t.saga.steps[0].compensation is None


# --- forward ---------------------------------------------------------------------------------


def test_success_dispatches_next_step_with_fresh_token() -> None:
    d = Driver(specs(True, True, True))
    first = d.in_flight
    t = d.succeed({"order": 7})
    assert t.ignored is None
    assert d.saga.state is S.STARTED
    s0 = d.saga.steps[0]
    assert s0.status is St.COMPLETED
    assert s0.output == {"order": 7}
    assert s0.executed_at == at(1)
    assert s0.token is None
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.action, cmd.attempt) == ("id-1", EXEC, "svc1.do", 1)
    assert cmd.input == {"n": 1}
    assert cmd.token != first.token
    assert d.saga.steps[1].token == cmd.token
    assert statuses(d) == [St.COMPLETED, St.STARTED, St.PENDING]
    assert [(h.event, h.step_name) for h in t.history] == [
        ("step_completed", "s0"),
        ("step_dispatched", "s1"),
    ]


def test_success_without_output_records_empty_output() -> None:
    d = Driver(specs(True, True))
    d.succeed(None)
    assert d.saga.steps[0].output == {}


def test_last_success_completes_saga() -> None:
    d = Driver(specs(True, False))
    run_forward(d, 1)
    t = d.succeed({"x": 1})
    assert t.commands == ()
    assert d.saga.state is S.COMPLETED
    assert d.saga.completed_at == at(2)
    assert d.saga.updated_at == at(2)
    assert statuses(d) == [St.COMPLETED, St.COMPLETED]
    assert [(h.from_state, h.to_state, h.event) for h in t.history] == [
        (S.STARTED, S.STARTED, "step_completed"),
        (S.STARTED, S.COMPLETED, "saga_completed"),
    ]


def test_single_step_saga_completes() -> None:
    d = Driver(specs(False))
    d.succeed()
    assert d.saga.state is S.COMPLETED


def test_updated_at_is_now_on_every_applied_event() -> None:
    d = Driver(specs(True, True))
    t = apply(d.saga, reply_to(d.in_flight), now=at(42), new_token=d.tokens)
    assert t.saga.updated_at == at(42)
    assert t.saga.created_at == T0


def test_happy_path_history() -> None:
    d = Driver(specs(True, True, False))
    run_forward(d, 3)
    assert d.saga.state is S.COMPLETED
    assert d.history() == [
        (None, S.STARTED, None, "saga_started"),
        (S.STARTED, S.STARTED, "s0", "step_dispatched"),
        (S.STARTED, S.STARTED, "s0", "step_completed"),
        (S.STARTED, S.STARTED, "s1", "step_dispatched"),
        (S.STARTED, S.STARTED, "s1", "step_completed"),
        (S.STARTED, S.STARTED, "s2", "step_dispatched"),
        (S.STARTED, S.STARTED, "s2", "step_completed"),
        (S.STARTED, S.COMPLETED, None, "saga_completed"),
    ]


# --- forward failure ----------------------------------------------------------------------


def test_first_step_failure_fails_saga_with_no_commands() -> None:
    d = Driver(specs(True, True, True))
    t = d.fail("card declined")
    assert t.commands == ()
    assert d.saga.state is S.FAILED
    assert d.saga.completed_at == at(1)
    s0 = d.saga.steps[0]
    assert s0.status is St.FAILED
    assert s0.error == "card declined"
    assert s0.executed_at == at(1)
    assert s0.token is None
    assert statuses(d) == [St.FAILED, St.SKIPPED, St.SKIPPED]
    assert [(h.from_state, h.to_state, h.step_name, h.event, h.reason) for h in t.history] == [
        (S.STARTED, S.STARTED, "s0", "step_failed", "card declined"),
        (S.STARTED, S.FAILED, None, "saga_failed", "card declined"),
    ]


def test_failure_after_only_uncompensable_steps_fails_saga() -> None:
    d = Driver(specs(False, False, True))
    run_forward(d, 2)
    t = d.fail()
    assert t.commands == ()
    assert d.saga.state is S.FAILED
    assert statuses(d) == [St.COMPLETED, St.COMPLETED, St.FAILED]


def test_failure_compensates_completed_steps_in_reverse_one_at_a_time() -> None:
    d = Driver(specs(True, True, True, True))
    run_forward(d, 2)
    t = d.fail("boom")
    assert d.saga.state is S.COMPENSATING
    assert d.saga.completed_at is None
    assert statuses(d) == [St.COMPLETED, St.COMPENSATING, St.FAILED, St.SKIPPED]
    assert d.saga.steps[2].error == "boom"
    (cmd,) = t.commands
    assert cmd.kind is COMP
    assert cmd.step_id == "id-1"
    assert cmd.action == "svc1.undo"
    assert cmd.attempt == 1
    assert cmd.input == {"n": 1}
    assert cmd.output == {"made": "s1"}
    assert cmd.context == {"customer": "c1"}
    assert d.saga.steps[1].token == cmd.token
    assert d.saga.steps[1].compensation_attempts == 1
    assert d.saga.steps[1].attempts == 1
    assert [(h.from_state, h.to_state, h.step_name, h.event) for h in t.history] == [
        (S.STARTED, S.STARTED, "s2", "step_failed"),
        (S.STARTED, S.COMPENSATING, "s2", "compensation_started"),
        (S.COMPENSATING, S.COMPENSATING, "s1", "compensation_dispatched"),
    ]

    t = d.succeed()
    s1 = d.saga.steps[1]
    assert s1.status is St.COMPENSATED
    assert s1.compensated_at == at(4)
    assert s1.token is None
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.action, cmd.output) == (
        "id-0",
        COMP,
        "svc0.undo",
        {"made": "s0"},
    )
    assert d.saga.state is S.COMPENSATING

    t = d.succeed()
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATED
    assert d.saga.completed_at == at(5)
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.FAILED, St.SKIPPED]
    assert [(h.from_state, h.to_state, h.step_name, h.event) for h in t.history] == [
        (S.COMPENSATING, S.COMPENSATING, "s0", "step_compensated"),
        (S.COMPENSATING, S.COMPENSATED, None, "saga_compensated"),
    ]


def test_steps_without_compensation_are_not_compensated() -> None:
    d = Driver(specs(True, False, True, False, True))
    run_forward(d, 4)
    d.fail()
    compensated = []
    while d.saga.state is S.COMPENSATING:
        cmd = d.in_flight
        compensated.append(cmd.step_id)
        d.succeed()
    assert compensated == ["id-2", "id-0"]
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPLETED, St.COMPENSATED, St.COMPLETED, St.FAILED]
    assert d.saga.steps[1].compensation_attempts == 0


def test_failure_with_single_compensable_step_ends_compensated() -> None:
    d = Driver(specs(False, True, False))
    run_forward(d, 2)
    d.fail()
    assert d.in_flight.step_id == "id-1"
    d.succeed()
    assert d.saga.state is S.COMPENSATED


def test_compensating_path_history() -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 2)
    d.fail("nope")
    d.succeed()
    d.succeed()
    assert d.history() == [
        (None, S.STARTED, None, "saga_started"),
        (S.STARTED, S.STARTED, "s0", "step_dispatched"),
        (S.STARTED, S.STARTED, "s0", "step_completed"),
        (S.STARTED, S.STARTED, "s1", "step_dispatched"),
        (S.STARTED, S.STARTED, "s1", "step_completed"),
        (S.STARTED, S.STARTED, "s2", "step_dispatched"),
        (S.STARTED, S.STARTED, "s2", "step_failed"),
        (S.STARTED, S.COMPENSATING, "s2", "compensation_started"),
        (S.COMPENSATING, S.COMPENSATING, "s1", "compensation_dispatched"),
        (S.COMPENSATING, S.COMPENSATING, "s1", "step_compensated"),
        (S.COMPENSATING, S.COMPENSATING, "s0", "compensation_dispatched"),
        (S.COMPENSATING, S.COMPENSATING, "s0", "step_compensated"),
        (S.COMPENSATING, S.COMPENSATED, None, "saga_compensated"),
    ]


# --- compensation failure --------------------------------------------------------------------


def test_compensation_failure_moves_to_compensation_failed() -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 2)
    d.fail("step broke")
    t = d.fail("undo broke")
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATION_FAILED
    assert d.saga.completed_at is None
    s1 = d.saga.steps[1]
    assert s1.status is St.COMPENSATION_FAILED
    assert s1.error == "undo broke"
    assert s1.token is None
    assert s1.compensated_at is None
    # The older step stays completed: nothing more is attempted automatically.
    assert statuses(d) == [St.COMPLETED, St.COMPENSATION_FAILED, St.FAILED]
    assert [(h.from_state, h.to_state, h.step_name, h.event, h.reason) for h in t.history] == [
        (S.COMPENSATING, S.COMPENSATING, "s1", "compensation_failed", "undo broke"),
        (S.COMPENSATING, S.COMPENSATION_FAILED, "s1", "saga_compensation_failed", "undo broke"),
    ]


def test_compensate_on_compensation_failed_is_illegal() -> None:
    d = Driver(specs(True, True))
    run_forward(d, 1)
    d.fail()
    d.fail()
    assert d.saga.state is S.COMPENSATION_FAILED
    before = d.saga
    with pytest.raises(WrongState):
        apply(before, CompensateRequested(reason="again"), now=at(99), new_token=d.tokens)
    assert d.saga is before


def test_replies_after_compensation_failed_are_ignored() -> None:
    d = Driver(specs(True, True))
    run_forward(d, 1)
    d.fail()
    comp_cmd = d.in_flight
    d.fail()
    before = d.saga
    for ev in (reply_to(comp_cmd), reply_to(comp_cmd, ok=False)):
        t = d.apply(ev)
        assert t.ignored
        assert t.saga is before


# --- Compensate requests ---------------------------------------------------------------------


def test_compensate_on_started_waits_for_in_flight_success_then_compensates_it_first() -> None:
    d = Driver(specs(True, True, True, True))
    run_forward(d, 2)
    in_flight = d.in_flight
    assert in_flight.step_id == "id-2"
    t = d.apply(CompensateRequested(reason="customer cancelled"))
    assert t.ignored is None
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATING
    assert statuses(d) == [St.COMPLETED, St.COMPLETED, St.STARTED, St.SKIPPED]
    assert [(h.from_state, h.to_state, h.event, h.reason) for h in t.history] == [
        (S.STARTED, S.COMPENSATING, "compensation_requested", "customer cancelled"),
    ]

    t = d.apply(reply_to(in_flight, output={"late": True}))
    assert d.saga.steps[2].status is St.COMPENSATING
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind, cmd.output) == ("id-2", COMP, {"late": True})

    order = [cmd.step_id]
    d.succeed()
    while d.saga.state is S.COMPENSATING:
        order.append(d.in_flight.step_id)
        d.succeed()
    assert order == ["id-2", "id-1", "id-0"]
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPENSATED, St.COMPENSATED, St.SKIPPED]


def test_compensate_on_started_in_flight_failure_is_not_compensated() -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 1)
    in_flight = d.in_flight
    d.apply(CompensateRequested())
    t = d.apply(reply_to(in_flight, ok=False, error="late failure"))
    assert d.saga.steps[1].status is St.FAILED
    assert d.saga.steps[1].error == "late failure"
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)
    d.succeed()
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.FAILED, St.SKIPPED]


def test_compensate_on_started_with_empty_reason_records_no_reason() -> None:
    d = Driver(specs(True, True))
    t = d.apply(CompensateRequested())
    assert t.history[0].reason is None


def test_compensate_on_first_in_flight_step_then_success_compensates_it() -> None:
    d = Driver(specs(True, True))
    first = d.in_flight
    d.apply(CompensateRequested())
    assert statuses(d) == [St.STARTED, St.SKIPPED]
    t = d.apply(reply_to(first))
    (cmd,) = t.commands
    assert (cmd.step_id, cmd.kind) == ("id-0", COMP)
    d.succeed()
    assert d.saga.state is S.COMPENSATED


def test_compensate_on_started_with_nothing_to_undo_ends_when_reply_arrives() -> None:
    d = Driver(specs(False, True))
    first = d.in_flight
    d.apply(CompensateRequested())
    t = d.apply(reply_to(first))
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATED
    assert d.saga.completed_at is not None


def test_compensate_on_completed_compensates_every_compensable_step_in_reverse() -> None:
    d = Driver(specs(True, False, True, True))
    run_forward(d, 4)
    assert d.saga.state is S.COMPLETED
    assert d.saga.completed_at is not None
    t = d.apply(CompensateRequested(reason="refund"))
    assert d.saga.state is S.COMPENSATING
    assert d.saga.completed_at is None
    assert [(h.from_state, h.to_state, h.event) for h in t.history] == [
        (S.COMPLETED, S.COMPENSATING, "compensation_requested"),
        (S.COMPENSATING, S.COMPENSATING, "compensation_dispatched"),
    ]
    order = []
    outputs = []
    while d.saga.state is S.COMPENSATING:
        cmd = d.in_flight
        assert cmd.kind is COMP
        order.append(cmd.step_id)
        outputs.append(cmd.output)
        d.succeed()
    assert order == ["id-3", "id-2", "id-0"]
    assert outputs == [{"made": "s3"}, {"made": "s2"}, {"made": "s0"}]
    assert d.saga.state is S.COMPENSATED
    assert statuses(d) == [St.COMPENSATED, St.COMPLETED, St.COMPENSATED, St.COMPENSATED]


def test_compensate_on_completed_with_nothing_to_undo_is_compensated_at_once() -> None:
    d = Driver(specs(False, False))
    run_forward(d, 2)
    t = d.apply(CompensateRequested())
    assert t.commands == ()
    assert d.saga.state is S.COMPENSATED
    assert d.saga.completed_at == at(3)


@pytest.mark.parametrize("target", [S.COMPENSATING, S.COMPENSATED, S.FAILED])
def test_compensate_is_ignored_when_already_undone_or_undoing(target: SagaState) -> None:
    d = Driver(specs(True, True))
    if target is S.FAILED:
        d.fail()
    else:
        run_forward(d, 1)
        d.fail()
        if target is S.COMPENSATED:
            d.succeed()
    assert d.saga.state is target
    before = d.saga
    t = apply(before, CompensateRequested(reason="x"), now=at(99), new_token=d.tokens)
    assert t.ignored
    assert t.saga is before
    assert t.saga.updated_at == before.updated_at
    assert t.commands == ()
    assert t.history == ()


# --- stale / forged / duplicate replies ------------------------------------------------------


def _stale_variants(d: Driver) -> dict[str, StepReplied]:
    cmd = d.in_flight
    other_kind = COMP if cmd.kind is EXEC else EXEC
    return {
        "wrong token": reply_to(cmd, token="forged"),
        "wrong attempt (lower)": reply_to(cmd, attempt=cmd.attempt - 1),
        "wrong attempt (higher)": reply_to(cmd, attempt=cmd.attempt + 1),
        "wrong kind": reply_to(cmd, kind=other_kind),
        "unknown step": reply_to(cmd, step_id="no-such-step"),
        "other step": reply_to(cmd, step_id="id-0" if cmd.step_id != "id-0" else "id-1"),
    }


@pytest.mark.parametrize("ok", [True, False])
@pytest.mark.parametrize(
    "variant",
    [
        "wrong token",
        "wrong attempt (lower)",
        "wrong attempt (higher)",
        "wrong kind",
        "unknown step",
        "other step",
    ],
)
@pytest.mark.parametrize("phase", ["execute", "compensate"])
def test_stale_replies_are_ignored(variant: str, ok: bool, phase: str) -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 2)
    if phase == "compensate":
        d.fail()
        assert d.in_flight.kind is COMP
    before = d.saga
    ev = _stale_variants(d)[variant]
    if not ok:
        ev = replace(ev, succeeded=False, output=None, error="x")
    t = apply(before, ev, now=at(99), new_token=d.tokens)
    assert t.ignored
    assert t.saga is before
    assert t.commands == ()
    assert t.history == ()
    # The genuine reply still works afterwards.
    t = apply(before, reply_to(d.in_flight), now=at(100), new_token=d.tokens)
    assert t.ignored is None


@pytest.mark.parametrize("ok", [True, False])
def test_duplicate_execute_reply_is_ignored(ok: bool) -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 1)
    cmd = d.in_flight
    d.apply(reply_to(cmd, ok=ok))
    before = d.saga
    for dup in (reply_to(cmd, ok=ok), reply_to(cmd, ok=not ok)):
        t = d.apply(dup)
        assert t.ignored
        assert t.saga is before
        assert (t.commands, t.history) == ((), ())


@pytest.mark.parametrize("ok", [True, False])
def test_duplicate_compensation_reply_is_ignored(ok: bool) -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 2)
    d.fail()
    cmd = d.in_flight
    d.apply(reply_to(cmd, ok=ok))
    before = d.saga
    for dup in (reply_to(cmd, ok=ok), reply_to(cmd, ok=not ok)):
        t = d.apply(dup)
        assert t.ignored
        assert t.saga is before


def test_replies_after_terminal_states_are_ignored() -> None:
    d = Driver(specs(True, True))
    cmds = []
    cmds.append(d.in_flight)
    d.succeed()
    cmds.append(d.in_flight)
    d.succeed()
    assert d.saga.state is S.COMPLETED
    before = d.saga
    for cmd in cmds:
        for ok in (True, False):
            t = d.apply(reply_to(cmd, ok=ok))
            assert t.ignored
            assert t.saga is before


def test_execute_reply_to_a_step_being_compensated_is_ignored() -> None:
    d = Driver(specs(True, True, True))
    exec_cmds = []
    for _ in range(2):
        exec_cmds.append(d.in_flight)
        d.succeed()
    d.fail()
    before = d.saga
    # An old execute reply for the step now compensating, even with the compensation's token.
    comp = d.in_flight
    stale = reply_to(exec_cmds[1], token=comp.token)
    t = d.apply(stale)
    assert t.ignored
    assert t.saga is before


def test_every_dispatch_gets_a_fresh_token_from_new_token() -> None:
    d = Driver(specs(True, True, True))
    run_forward(d, 2)
    d.fail()
    while d.saga.state is S.COMPENSATING:
        d.succeed()
    seen = [c.token for c in d.commands]
    assert seen == d.tokens.issued
    assert len(set(seen)) == 5


def test_state_sets_match_the_proto_docs() -> None:
    from coordinator.engine import ACTIVE_STATES, FINAL_STATES

    assert {S.STARTED, S.COMPENSATING, S.COMPENSATION_FAILED} == ACTIVE_STATES
    assert {S.FAILED, S.COMPENSATED} == FINAL_STATES
    assert not ACTIVE_STATES & FINAL_STATES
