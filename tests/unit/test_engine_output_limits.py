"""Outputs the engine refuses: past a step's limit, or past the saga's total. The action
took effect, so the step fails with its outcome unknown and is compensated."""

from __future__ import annotations

from dataclasses import replace

from engine_helpers import Driver, reply_to, specs
from hypothesis import given
from hypothesis import strategies as st

from coordinator.engine import CommandKind, SagaState, StepStatus
from coordinator.engine.transitions import json_size
from sagaplane.limits import MAX_OUTPUT_BYTES, MAX_SAGA_OUTPUT_BYTES


def test_an_output_past_the_step_limit_fails_the_step_and_undoes_it() -> None:
    d = Driver(specs(True, True, True))
    d.succeed({"order": 1})
    t = d.apply(replace(reply_to(d.in_flight), output=None, output_size=MAX_OUTPUT_BYTES + 1))
    step = d.step(1)
    # Its own undo runs first: the step failed with its outcome unknown.
    assert step.status is StepStatus.COMPENSATING and step.outcome_unknown
    assert step.error is not None and step.error.startswith("OutputTooLarge: ")
    assert step.output is None
    # Not retried (it would only succeed as large again); undone newest first.
    assert step.attempts == 1
    assert d.saga.state is SagaState.COMPENSATING
    assert [(c.kind, c.step_name) for c in t.commands] == [(CommandKind.COMPENSATE, "s1")]


def test_an_output_at_the_step_limit_is_kept() -> None:
    d = Driver(specs(True))
    d.apply(replace(reply_to(d.in_flight, output={"x": 1}), output_size=MAX_OUTPUT_BYTES))
    assert d.saga.state is SagaState.COMPLETED and d.step(0).output == {"x": 1}


def test_outputs_past_the_saga_total_are_refused() -> None:
    n = MAX_SAGA_OUTPUT_BYTES // MAX_OUTPUT_BYTES + 2
    d = Driver(specs(*([True] * n)))
    blob = {"b": "x" * (MAX_OUTPUT_BYTES - 100)}
    size = json_size(blob)
    for i in range(n):
        total = (i + 1) * size
        d.apply(replace(reply_to(d.in_flight, output=blob), output_size=size))
        if total > MAX_SAGA_OUTPUT_BYTES:
            assert d.step(i).status is StepStatus.COMPENSATING and d.step(i).outcome_unknown
            assert "saga's outputs would take" in (d.step(i).error or "")
            assert d.saga.state is SagaState.COMPENSATING
            return
        assert d.step(i).status is StepStatus.COMPLETED
    raise AssertionError("the saga's total was never reached")


@given(st.integers(min_value=0, max_value=3 * MAX_OUTPUT_BYTES))
def test_only_the_size_decides(size: int) -> None:
    d = Driver(specs(True))
    d.apply(replace(reply_to(d.in_flight, output={}), output_size=size))
    completed = d.step(0).status is StepStatus.COMPLETED
    assert completed == (size <= MAX_OUTPUT_BYTES)


def test_a_reply_with_a_forged_token_is_refused_not_just_ignored() -> None:
    d = Driver(specs(True))
    t = d.apply(reply_to(d.in_flight, token="forged"))
    assert t.ignored and t.refused
    late = d.apply(reply_to(d.in_flight, attempt=7))
    assert late.ignored and not late.refused
