"""The engine on sagas whose steps form a graph (``depends_on``): fan-out, join, and
compensation in reverse dependency order, by example and over random graphs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import pytest
from engine_helpers import T0, Tokens, fspec, policy, reply_to, start_saga
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.engine import (
    Command,
    CommandKind,
    CompensateRequested,
    CompensationResolved,
    InvalidSpec,
    Resolution,
    Saga,
    SagaDeadlinePassed,
    SagaState,
    StepSpec,
    StepStatus,
    TimerFired,
    Transition,
    apply,
    conditions,
)
from coordinator.engine.graph import InvalidGraph, dependencies, descendants, resolve

S = SagaState
EXEC = CommandKind.EXECUTE
COMP = CommandKind.COMPENSATE
UNDOING = {StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRYING}


def node(name: str, *depends_on: str, compensable: bool = True, root: bool = False) -> StepSpec:
    """A step named ``name`` waiting for ``depends_on`` (``root``: for nothing)."""
    return StepSpec(
        name=name,
        action=f"{name}.do",
        compensation=f"{name}.undo" if compensable else None,
        depends_on=() if root else (tuple(depends_on) or None),
    )


def names(commands: tuple[Command, ...] | list[Command]) -> list[tuple[str, CommandKind]]:
    return [(c.step_name, c.kind) for c in commands]


class Graph:
    """A saga being driven by hand: answer the command of a step by its name."""

    def __init__(self, *step_specs: StepSpec) -> None:
        self.tokens = Tokens()
        self.now = T0
        t = start_saga(list(step_specs), tokens=self.tokens)
        self.saga: Saga = t.saga
        self.first = t
        self.flying: dict[tuple[str, CommandKind], Command] = {
            (c.step_name, c.kind): c for c in t.commands
        }

    def answer(self, name: str, kind: CommandKind = EXEC, **reply: object) -> Transition:
        command = self.flying.pop((name, kind))
        return self._apply(reply_to(command, **reply))  # type: ignore[arg-type]

    def compensate(self) -> Transition:
        return self._apply(CompensateRequested(reason="asked"))

    def _apply(self, event: object) -> Transition:
        self.now += timedelta(seconds=1)
        t = apply(self.saga, event, now=self.now, new_token=self.tokens)  # type: ignore[arg-type]
        self.saga = t.saga
        self.flying |= {(c.step_name, c.kind): c for c in t.commands}
        return t

    def status(self, name: str) -> StepStatus:
        return next(s.status for s in self.saga.steps if s.name == name)


# -- resolving depends_on --------------------------------------------------------------------


def test_steps_that_say_nothing_wait_for_the_step_before() -> None:
    assert resolve([node("a"), node("b"), node("c")]) == (None, None, None)
    t = start_saga([node("a"), node("b")])
    assert [dependencies(t.saga.steps, i) for i in range(2)] == [(), (0,)]


def test_depends_on_names_become_positions_and_forward_names_are_allowed() -> None:
    assert resolve([node("a", "c"), node("b", root=True), node("c", "b")]) == ((2,), (), (1,))


@pytest.mark.parametrize(
    ("step_specs", "message"),
    [
        ([node("a"), node("b", "x")], 'steps[1].depends_on[0]: no step named "x"'),
        ([node("a"), node("b", "b")], "steps[1].depends_on[0]: a step cannot depend on itself"),
        ([node("a"), node("b", "a", "a")], 'steps[1].depends_on[1]: "a" is given twice'),
        (
            [node("a", "c"), node("b", "a"), node("c", "b")],
            "steps: the dependencies form a cycle (each needs the next): a -> c -> b -> a",
        ),
        # The first step, saying nothing, has no dependency; a later one may still loop.
        (
            [node("a"), node("b", "c"), node("c")],
            "steps: the dependencies form a cycle (each needs the next): b -> c -> b",
        ),
    ],
)
def test_bad_dependencies_are_refused_naming_the_field(
    step_specs: list[StepSpec], message: str
) -> None:
    with pytest.raises(InvalidGraph) as refused:
        start_saga(step_specs)
    assert str(refused.value) == message


def test_descendants_are_transitive() -> None:
    t = start_saga([node("a", root=True), node("b", "a"), node("c", "b"), node("d", root=True)])
    assert descendants(t.saga.steps) == [
        frozenset({1, 2}),
        frozenset({2}),
        frozenset(),
        frozenset(),
    ]


# -- forward: fan-out and join --------------------------------------------------------------


def test_fan_out_dispatches_every_ready_step_in_one_transition_and_join_waits_for_all() -> None:
    g = Graph(node("create"), node("reserve", "create"), node("address", "create"),
              node("charge", "reserve", "address"))  # fmt: skip
    assert names(g.first.commands) == [("create", EXEC)]
    assert names(g.answer("create").commands) == [("reserve", EXEC), ("address", EXEC)]
    waiting = g.answer("address")
    assert waiting.commands == () and g.saga.state is S.STARTED
    assert g.status("charge") is StepStatus.PENDING
    assert names(g.answer("reserve").commands) == [("charge", EXEC)]
    done = g.answer("charge")
    assert done.commands == () and g.saga.state is S.COMPLETED


def test_steps_that_depend_on_nothing_all_start_at_once() -> None:
    g = Graph(node("a", root=True), node("b", root=True), node("c", "a", "b"))
    assert names(g.first.commands) == [("a", EXEC), ("b", EXEC)]


def test_a_retrying_branch_does_not_hold_the_other_back() -> None:
    g = Graph(node("a", root=True), node("b", root=True), node("c", "a"))
    g.answer("b", ok=False, retryable=True)
    assert g.status("b") is StepStatus.RETRYING
    assert names(g.answer("a").commands) == [("c", EXEC)]


# -- compensation in reverse dependency order ------------------------------------------------


def test_independent_branches_are_undone_together_and_their_root_after_both() -> None:
    g = Graph(node("root"), node("left", "root"), node("right", "root"))
    g.answer("root")
    g.answer("left")
    g.answer("right")
    assert g.saga.state is S.COMPLETED
    assert names(g.compensate().commands) == [("right", COMP), ("left", COMP)]
    assert g.answer("left", COMP).commands == ()  # the root waits for the other branch
    assert names(g.answer("right", COMP).commands) == [("root", COMP)]
    g.answer("root", COMP)
    assert g.saga.state is S.COMPENSATED


def test_a_failure_waits_for_the_branch_in_flight_then_undoes_it_first() -> None:
    g = Graph(node("root"), node("left", "root"), node("right", "root"))
    g.answer("root")
    failed = g.answer("left", ok=False)
    assert g.saga.state is S.COMPENSATING
    assert failed.commands == ()  # right is still in flight: it may need undoing
    assert names(g.answer("right").commands) == [("right", COMP)]
    assert names(g.answer("right", COMP).commands) == [("root", COMP)]
    g.answer("root", COMP)
    assert g.saga.state is S.COMPENSATED
    assert g.status("left") is StepStatus.FAILED


def test_an_undo_waits_for_descendants_beyond_a_step_with_nothing_to_undo() -> None:
    g = Graph(node("a"), node("b", compensable=False), node("c"))
    for name in ("a", "b", "c"):
        g.answer(name)
    # a's child b has nothing to undo, but its grandchild c does: c goes first.
    assert names(g.compensate().commands) == [("c", COMP)]
    assert names(g.answer("c", COMP).commands) == [("a", COMP)]


def test_a_branch_whose_undo_failed_for_good_stops_the_saga_once_the_other_is_undone() -> None:
    quick = policy(1)
    steps = [
        node("root"),
        replace(node("left", "root"), compensation_retry=quick),
        replace(node("right", "root"), compensation_retry=quick),
    ]
    g = Graph(*steps)
    for name in ("root", "left", "right"):
        g.answer(name)
    g.compensate()
    g.answer("left", COMP, ok=False)
    assert g.saga.state is S.COMPENSATION_FAILED
    # The other branch's undo goes on and lands; the saga still waits for a person.
    assert g.answer("right", COMP).commands == ()
    assert g.saga.state is S.COMPENSATION_FAILED
    assert g.status("right") is StepStatus.COMPENSATED
    g.now += timedelta(seconds=1)
    resolved = apply(
        g.saga,
        CompensationResolved(resolution=Resolution.MARK_COMPENSATED, reason="by hand"),
        now=g.now,
        new_token=g.tokens,
    )
    assert names(resolved.commands) == [("root", COMP)]


def test_a_sequential_saga_is_undone_newest_first_one_at_a_time() -> None:
    g = Graph(node("a"), node("b"), node("c"))
    for name in ("a", "b", "c"):
        g.answer(name)
    order = []
    t = g.compensate()
    while t.commands:
        assert len(t.commands) == 1
        order.append(t.commands[0].step_name)
        t = g.answer(t.commands[0].step_name, COMP)
    assert order == ["c", "b", "a"] and g.saga.state is S.COMPENSATED


# -- random graphs --------------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> list[StepSpec]:
    """Up to 12 steps; each says nothing (the step before) or names earlier steps."""
    n = draw(st.integers(1, 12))
    result = []
    for i in range(n):
        kind = draw(st.sampled_from(["default", "some", "none"]) if i else st.just("default"))
        deps: tuple[str, ...] | None = None
        if kind == "some":
            picked = draw(st.sets(st.integers(0, i - 1), min_size=1, max_size=min(i, 3)))
            deps = tuple(f"s{j}" for j in sorted(picked))
        elif kind == "none":
            deps = ()
        result.append(
            replace(
                fspec(
                    i,
                    compensable=draw(st.booleans()),
                    retry=policy(draw(st.integers(1, 3)), initial=1, maximum=4),
                    compensation_retry=policy(draw(st.integers(1, 3)), initial=1, maximum=4),
                    timeout=timedelta(seconds=30),
                ),
                depends_on=deps,
            )
        )
    return result


@dataclass
class Run:
    """Feeds random events to the engine and checks the graph's rules on every transition."""

    step_specs: list[StepSpec]
    tokens: Tokens = field(default_factory=Tokens)
    now: datetime = T0
    saga: Saga = field(init=False)
    flying: dict[str, Command] = field(default_factory=dict)
    """Commands sent and not answered yet, by token."""
    compensated: dict[int, int] = field(default_factory=dict)
    """How many times each step became COMPENSATED."""
    deadline: timedelta | None = None
    """The saga's own time limit (``StartSaga.timeout``), if any."""

    def __post_init__(self) -> None:
        t = start_saga(self.step_specs, tokens=self.tokens, timeout=self.deadline)
        self.saga = t.saga
        self._check(t, previous=None)

    def apply(self, event: object, now: datetime | None = None) -> Transition:
        self.now = now if now is not None else self.now + timedelta(seconds=1)
        before = self.saga
        t = apply(before, event, now=self.now, new_token=self.tokens)  # type: ignore[arg-type]
        self.saga = t.saga
        self._check(t, previous=before)
        return t

    def _check(self, t: Transition, previous: Saga | None) -> None:
        saga = t.saga
        steps = saga.steps
        below = descendants(steps)
        if previous is not None and previous.state in (S.COMPLETED, S.FAILED, S.COMPENSATED):
            assert t.commands == (), "no command after the saga ended"
        for c in t.commands:
            i = next(s.position for s in steps if s.id == c.step_id)
            if c.kind is EXEC:
                # Sent from a saga running forward (a sibling that then failed before its
                # dispatch, in the same transition, may have turned it to compensating).
                assert previous is None or previous.state is S.STARTED
                for d in dependencies(steps, i):
                    # Skipped (by a false condition) counts as done.
                    assert steps[d].status in (StepStatus.COMPLETED, StepStatus.SKIPPED), (
                        f"{c.step_name} dispatched before its dependency {steps[d].name} is done"
                    )
            else:
                assert previous is None or previous.steps[i].status is not StepStatus.SKIPPED
                for j in below[i]:
                    assert steps[j].status not in (*UNDOING, StepStatus.COMPENSATION_FAILED), (
                        f"{c.step_name} undone while its dependent {steps[j].name} is undoing"
                    )
                    assert not (
                        steps[j].compensation
                        and (
                            steps[j].status is StepStatus.COMPLETED
                            or (steps[j].status is StepStatus.FAILED and steps[j].outcome_unknown)
                        )
                    ), f"{c.step_name} undone before its dependent {steps[j].name}"
        for c in t.commands:
            self.flying[c.token] = c
        for s in steps:
            was = previous.steps[s.position].status if previous is not None else None
            if s.status is StepStatus.COMPENSATED and was is not StepStatus.COMPENSATED:
                self.compensated[s.position] = self.compensated.get(s.position, 0) + 1
            if was is StepStatus.SKIPPED:
                assert s.status is StepStatus.SKIPPED, "a skipped step never runs or is undone"
        # Tokens held are exactly the commands awaited.
        held = {s.token for s in steps if s.token is not None}
        self.flying = {k: v for k, v in self.flying.items() if k in held}

    def timers(self) -> list[tuple[datetime, str]]:
        return sorted((s.deadline_at, s.id) for s in self.saga.steps if s.deadline_at is not None)


def drive(data: st.DataObject, run: Run, budget: int) -> None:
    """Random replies (successes, retryable and final failures), timers and Compensate
    calls, up to ``budget`` events; then answer everything with success until the saga
    ends, resolving a stuck compensation by marking it compensated."""
    for _ in range(budget):
        if run.saga.state in (S.COMPLETED, S.FAILED, S.COMPENSATED):
            break
        choices = ["compensate"]
        if run.flying:
            choices += ["reply", "reply", "reply"]
        if run.timers():
            choices.append("timer")
        if run.saga.state is S.COMPENSATION_FAILED:
            choices.append("resolve")
        if run.saga.deadline_at is not None:
            choices.append("deadline")
        what = data.draw(st.sampled_from(choices))
        if what == "reply":
            token = data.draw(st.sampled_from(sorted(run.flying)))
            outcome = data.draw(st.sampled_from(["ok", "ok", "retryable", "final"]))
            command = run.flying[token]
            run.apply(reply_to(command, ok=outcome == "ok", retryable=outcome == "retryable"))
        elif what == "timer":
            deadline, step_id = run.timers()[0]
            run.apply(TimerFired(step_id=step_id), now=max(run.now, deadline))
        elif what == "deadline":
            assert run.saga.deadline_at is not None
            run.apply(SagaDeadlinePassed(), now=max(run.now, run.saga.deadline_at))
        elif what == "resolve":
            resolution = data.draw(st.sampled_from(list(Resolution)))
            run.apply(CompensationResolved(resolution=resolution, reason="test"))
        elif run.saga.state not in (S.COMPENSATION_FAILED,):
            run.apply(CompensateRequested(reason="test"))
    for _ in range(2000):
        if run.saga.state in (S.COMPLETED, S.FAILED, S.COMPENSATED):
            return
        if run.saga.state is S.COMPENSATION_FAILED and not run.flying and not run.timers():
            run.apply(CompensationResolved(resolution=Resolution.MARK_COMPENSATED, reason="t"))
        elif run.flying:
            command = run.flying[sorted(run.flying)[0]]
            run.apply(reply_to(command))
        else:
            deadline, step_id = run.timers()[0]
            run.apply(TimerFired(step_id=step_id), now=max(run.now, deadline))
    raise AssertionError(f"the saga did not end: {run.saga.state}")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    step_specs=graphs(),
    budget=st.integers(0, 40),
    deadline=st.none() | st.integers(5, 120).map(lambda s: timedelta(seconds=s)),
)
def test_random_graphs_end_and_keep_the_order_of_dependencies(
    data: st.DataObject, step_specs: list[StepSpec], budget: int, deadline: timedelta | None
) -> None:
    """Random replies, failures, timers, Compensate calls, resolutions and (when the saga
    has a time limit) its deadline passing."""
    run = Run(step_specs, deadline=deadline)
    drive(data, run, budget)
    saga = run.saga
    assert saga.state in (S.COMPLETED, S.FAILED, S.COMPENSATED)
    assert not run.flying and all(s.token is None for s in saga.steps)
    assert all(n == 1 for n in run.compensated.values()), "each step is undone at most once"
    if saga.state is S.COMPLETED:
        assert all(s.status is StepStatus.COMPLETED for s in saga.steps)
    else:
        for s in saga.steps:
            # Nothing that took (or may have taken) effect is left undone.
            assert not (s.compensation and s.status is StepStatus.COMPLETED), s
            assert not (s.compensation and s.status is StepStatus.FAILED and s.outcome_unknown)
            assert s.status is not StepStatus.PENDING


# -- data between steps ----------------------------------------------------------------------


def test_each_command_carries_the_outputs_of_the_completed_steps_it_depends_on() -> None:
    g = Graph(node("create"), node("left", "create"), node("right", "create"),
              node("join", "left", "right"))  # fmt: skip
    fanned = g.answer("create", output={"order_id": 17})
    assert {c.step_name: c.results for c in fanned.commands} == {
        "left": {"create": {"order_id": 17}},
        "right": {"create": {"order_id": 17}},
    }
    g.answer("left", output={"side": "l"})
    (joined,) = g.answer("right", output={"side": "r"}).commands
    assert joined.results == {
        "create": {"order_id": 17},
        "left": {"side": "l"},
        "right": {"side": "r"},
    }


def test_a_reference_in_an_input_is_replaced_by_the_value_at_dispatch() -> None:
    charge = replace(
        node("charge"),
        input={
            "order_id": "${steps.create.output.order_id}",
            "ref": "${steps.create.output.ref}",
            "who": "${context.customer}",
            "all": "${steps.create.output}",
            "said": "order ${steps.create.output.order_id}",  # not exactly a reference
            "nested": [{"id": "${steps.create.output.order_id}"}],
        },
    )
    g = Graph(node("create"), charge)
    t = g.answer("create", output={"order_id": 17, "ref": "o-17"})
    (command,) = t.commands
    resolved = {
        "order_id": 17,
        "ref": "o-17",
        "who": "c1",
        "all": {"order_id": 17, "ref": "o-17"},
        "said": "order ${steps.create.output.order_id}",
        "nested": [{"id": 17}],
    }
    assert command.input == resolved
    assert g.saga.steps[1].input == resolved  # what GetSaga shows from now on
    dispatched = [h for h in t.history if h.event == "step_dispatched"]
    assert dispatched[0].reason is not None and dispatched[0].reason.startswith(
        'input: {"order_id":17'
    )


def test_a_reference_to_a_missing_value_fails_the_step_for_good_and_compensates() -> None:
    charge = replace(node("charge"), input={"order_id": "${steps.create.output.order.id}"})
    g = Graph(node("create"), charge)
    t = g.answer("create", output={"order": {"number": 17}})
    assert names(t.commands) == [("create", COMP)]
    step = g.saga.steps[1]
    assert step.status is StepStatus.FAILED and step.attempts == 0
    assert step.error == (
        'input.order_id: ${steps.create.output.order.id}: the output of "create" has no order.id'
    )
    assert g.saga.state is S.COMPENSATING


def test_a_missing_context_value_fails_the_first_step_at_start() -> None:
    t = start_saga([replace(node("a"), input={"x": "${context.nothing}"})])
    assert t.saga.state is S.FAILED and t.commands == ()
    assert t.saga.steps[0].error == "input.x: ${context.nothing}: the context has no nothing"


@pytest.mark.parametrize(
    ("step_specs", "message"),
    [
        (
            [
                node("a"),
                node("b", root=True),
                replace(node("c", "b"), input={"v": "${steps.a.output.x}"}),
            ],
            'steps[2].input.v: ${steps.a.output.x}: "a" is not a step this one depends on '
            "(directly or not), so its output may not exist yet",
        ),
        (
            [node("a"), replace(node("b"), input={"v": ["${steps.zz.output}"]})],
            'steps[1].input.v[0]: ${steps.zz.output}: no step named "zz"',
        ),
        (
            [replace(node("a"), input={"v": "${steps.a.output.x}"})],
            'steps[0].input.v: ${steps.a.output.x}: "a" is not a step this one depends on '
            "(directly or not), so its output may not exist yet",
        ),
    ],
)
def test_references_to_steps_that_may_not_have_run_are_refused_at_start(
    step_specs: list[StepSpec], message: str
) -> None:
    with pytest.raises(InvalidSpec) as refused:
        start_saga(step_specs)
    assert str(refused.value) == message


def test_a_transitive_ancestor_may_be_referred_to() -> None:
    g = Graph(node("a"), node("b"), replace(node("c"), input={"v": "${steps.a.output.x}"}))
    g.answer("a", output={"x": [1, 2]})
    (command,) = g.answer("b").commands
    assert command.input == {"v": [1, 2]}


# -- conditional steps -----------------------------------------------------------------------


def test_a_false_condition_skips_the_step_and_its_dependents_go_on() -> None:
    g = Graph(
        node("create"),
        replace(node("wrap", "create"), when="context.customer == 'vip'"),
        node("ship", "create"),
        node("done", "wrap", "ship"),
    )
    fanned = g.answer("create", output={"total": 42})
    assert names(fanned.commands) == [("ship", EXEC)]
    assert g.status("wrap") is StepStatus.SKIPPED
    skipped = [h for h in fanned.history if h.event == "step_skipped"]
    assert [(h.step_name, h.reason) for h in skipped] == [
        ("wrap", "when \"context.customer == 'vip'\" is false")
    ]
    assert names(g.answer("ship").commands) == [("done", EXEC)]
    g.answer("done")
    assert g.saga.state is S.COMPLETED
    # Undone later, a skipped step has nothing to undo.
    order = []
    t = g.compensate()
    while t.commands:
        order += [c.step_name for c in t.commands]
        t = g.answer(t.commands[0].step_name, COMP)
    assert "wrap" not in order and g.status("wrap") is StepStatus.SKIPPED


def test_a_true_condition_over_an_earlier_output_dispatches_the_step() -> None:
    g = Graph(node("create"), replace(node("approve"), when="steps.create.output.total > 100"))
    assert names(g.answer("create", output={"total": 500}).commands) == [("approve", EXEC)]


def test_a_saga_whose_last_steps_are_skipped_completes() -> None:
    g = Graph(node("a"), replace(node("b"), when="false"), replace(node("c"), when="false"))
    done = g.answer("a")
    assert done.commands == () and g.saga.state is S.COMPLETED
    assert [s.status for s in g.saga.steps] == [
        StepStatus.COMPLETED,
        StepStatus.SKIPPED,
        StepStatus.SKIPPED,
    ]


@pytest.mark.parametrize(
    ("when", "error"),
    [
        ("context.nothing == 1", "when 'context.nothing == 1': "),
        ("context.customer", "when 'context.customer': is str 'c1', not true or false"),
    ],
)
def test_a_condition_that_cannot_be_decided_fails_the_step_for_good(when: str, error: str) -> None:
    g = Graph(node("a"), replace(node("b"), when=when))
    t = g.answer("a")
    step = g.saga.steps[1]
    assert step.status is StepStatus.FAILED and step.attempts == 0
    assert (step.error or "").startswith(error), step.error
    assert names(t.commands) == [("a", COMP)]


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("context.gift ==", "steps[1].when: is not a CEL expression: "),
        ("order.total > 1", "steps[1].when: uses order: only context and steps are known"),
        ("steps.b.output.x == 1", 'steps[1].when: steps.b: "b" is not a step this one depends'),
        ("steps['zz'].output.x == 1", 'steps[1].when: steps.zz: no step named "zz"'),
        ("has(steps.nope.output)", 'steps[1].when: steps.nope: no step named "nope"'),
    ],
)
def test_a_condition_that_does_not_compile_is_refused_at_start(when: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        start_saga([node("a"), replace(node("b"), when=when)])
    assert str(refused.value).startswith(message), str(refused.value)


def test_a_condition_may_name_any_step_above_its_own_and_quote_any_text() -> None:
    when = "steps.a.output.ok && steps['b'].output.n > 1 && context.note != 'steps.zz'"
    steps = [node("a"), node("b"), replace(node("c"), when=when)]
    assert start_saga(steps).saga.steps[2].when == when


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ('steps.a.output.x == steps [ "b" ].output.y', ["a", "b"]),
        ("context.steps.a == 1 || mysteps.b", []),
        ("'steps.a' + \"steps.b\" + '''steps.c''' + r'steps.d' == ''", []),
        ("'it\\'s' == steps.e.output.s", ["e"]),
    ],
)
def test_the_steps_a_condition_names_are_found_outside_string_literals(
    expression: str, names: list[str]
) -> None:
    assert conditions.step_names(expression) == names


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), step_specs=graphs(), budget=st.integers(0, 40))
def test_random_graphs_with_conditions_end_and_never_run_or_undo_a_skipped_step(
    data: st.DataObject, step_specs: list[StepSpec], budget: int
) -> None:
    conditioned = [
        replace(s, when=data.draw(st.sampled_from([None, "true", "false", "context.flag"])))
        for s in step_specs
    ]
    run = Run(conditioned)
    context_flag = run.saga.context.get("flag")
    drive(data, run, budget)
    saga = run.saga
    assert saga.state in (S.COMPLETED, S.FAILED, S.COMPENSATED)
    for spec, s in zip(conditioned, saga.steps, strict=True):
        if spec.when == "false":
            assert s.status is StepStatus.SKIPPED and s.attempts == 0
        if s.status is StepStatus.SKIPPED:
            assert s.attempts == 0 and s.compensation_attempts == 0
        if spec.when == "context.flag" and context_flag is None and s.attempts:
            raise AssertionError("a step whose condition errs is never dispatched")


def test_what_the_engine_records_of_a_condition_or_an_input_is_bounded() -> None:
    big = {"blob": "x" * 10_000}
    g = Graph(node("a"), replace(node("b"), when="steps.a.output"))
    g.answer("a", output=big)
    error = g.saga.steps[1].error or ""
    assert error.startswith("when 'steps.a.output': is dict") and len(error) == 2000
    assert error.endswith("\N{HORIZONTAL ELLIPSIS}")
    h = Graph(node("a"), replace(node("b"), input={"all": "${steps.a.output}"}))
    dispatched = h.answer("a", output=big)
    (command,) = dispatched.commands
    assert command.input == {"all": big}  # sent whole
    (entry,) = [e for e in dispatched.history if e.event == "step_dispatched"]
    assert entry.reason is not None and len(entry.reason) == 2000
