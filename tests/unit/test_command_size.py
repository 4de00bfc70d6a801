"""The largest command the coordinator can send fits the wire's message limit, and an
input whose references would bring in more than their budget fails its step at once.

A command carries the step's input (references resolved), the saga's context, the
outputs of every step it depends on and, to a compensation, its own output: each is
bounded, so the whole is. The worst case is built here from the limits themselves.
"""

from __future__ import annotations

from dataclasses import replace

from engine_helpers import Driver, reply_to

from coordinator.api.validation import MAX_NAME, MAX_PAYLOAD_BYTES, MAX_STEPS
from coordinator.engine import CommandKind, CompensateRequested, StepSpec, StepStatus
from coordinator.engine.references import MAX_RESOLVED_BYTES
from coordinator.engine.transitions import json_size
from coordinator.messaging.codec import encode_command
from sagaplane import structs
from sagaplane.limits import MAX_MESSAGE_BYTES, MAX_OUTPUT_BYTES, MAX_SAGA_INPUT_BYTES


def _largest(limit: int) -> dict[str, object]:
    """The JSON object whose Struct comes nearest ``limit`` bytes: a list of zeros, the
    form that grows most from JSON (2 bytes each) to protobuf (11 bytes each)."""
    n = limit // 11
    while structs.to_struct({"z": [0] * n}).ByteSize() > limit:
        n -= 1
    return {"z": [0] * n}


def _name(i: int) -> str:
    return f"{i:03d}".ljust(MAX_NAME, "n")


def test_the_largest_command_fits_the_message_limit() -> None:
    output = _largest(MAX_OUTPUT_BYTES)
    context = _largest(MAX_PAYLOAD_BYTES)
    per_ref = json_size(output)
    refs = MAX_RESOLVED_BYTES // per_ref  # as many whole outputs as the budget takes
    ancestors = MAX_STEPS - 1
    steps = [
        StepSpec(name=_name(i), action="a.do", compensation="a.undo", input={}, depends_on=())
        for i in range(ancestors)
    ]
    steps.append(
        StepSpec(
            name=_name(ancestors),
            action="a.do",
            compensation="a.undo",
            input={f"r{i}": f"${{steps.{_name(i)}.output}}" for i in range(refs)},
            depends_on=tuple(_name(i) for i in range(ancestors)),
        )
    )
    d = Driver(steps, context=context)
    size = structs.to_struct(output).ByteSize()
    for command in list(d.last.commands):
        d.apply(replace(reply_to(command, output=output), output_size=size))
    (last,) = d.last.commands
    assert last.step_name == _name(ancestors) and len(last.results) == ancestors
    # Its own output back, for the compensation: the largest command of all.
    d.apply(replace(reply_to(last, output=output), output_size=size))
    t = d.apply(CompensateRequested(reason="worst case"))
    compensation = next(c for c in t.commands if c.step_name == _name(ancestors))
    assert compensation.kind is CommandKind.COMPENSATE and compensation.output == output
    body = encode_command(compensation).body
    print(f"largest command: {len(body)} bytes, limit {MAX_MESSAGE_BYTES}")
    assert len(body) <= MAX_MESSAGE_BYTES
    assert len(encode_command(last).body) <= len(body)


def test_references_past_their_budget_fail_the_step_for_good_at_once() -> None:
    blob = {"b": "x" * 60_000}
    steps = [
        StepSpec(name="a", action="a.do", compensation="a.undo", input={}),
        StepSpec(
            name="b",
            action="b.do",
            compensation=None,
            # 64 KiB of input naming one 60 KB output 2,000 times: 120 MB resolved.
            input={f"k{i}": "${steps.a.output}" for i in range(2000)},
        ),
    ]
    d = Driver(steps)
    d.apply(reply_to(d.in_flight, output=blob))
    b = d.step(1)
    assert b.status is StepStatus.FAILED and b.attempts == 0
    assert b.error is not None and b.error.endswith(
        f"the input's references bring in more than {MAX_RESOLVED_BYTES} bytes"
    )
    assert b.input == steps[1].input  # as written: nothing of the 120 MB is kept
    # Nothing was sent for b; the saga undoes a.
    assert [(c.kind, c.step_name) for c in d.last.commands] == [(CommandKind.COMPENSATE, "a")]


def test_references_within_their_budget_are_resolved() -> None:
    blob = {"b": "x" * 60_000, "n": 7}
    refs = {f"k{i}": "${steps.a.output.n}" for i in range(100)}
    steps = [
        StepSpec(name="a", action="a.do", compensation="a.undo", input={}),
        StepSpec(
            name="b",
            action="b.do",
            compensation=None,
            input={"all": "${steps.a.output}", **refs},
        ),
    ]
    d = Driver(steps)
    d.apply(reply_to(d.in_flight, output=blob))
    assert d.step(1).status is StepStatus.STARTED
    assert d.step(1).input == {"all": blob, **{k: 7 for k in refs}}


def test_the_saga_s_inputs_together_stay_within_their_limit() -> None:
    blob = {"b": "x" * 60_000}
    n = MAX_SAGA_INPUT_BYTES // json_size(blob) + 2
    steps = [StepSpec(name="a", action="a.do", compensation="a.undo", input={})]
    steps += [
        StepSpec(
            name=f"s{i}", action="s.do", compensation="s.undo", input={"v": "${steps.a.output}"}
        )
        for i in range(n)
    ]
    d = Driver(steps)
    d.apply(reply_to(d.in_flight, output=blob))
    for i in range(1, n + 1):
        if d.step(i).status is StepStatus.FAILED:
            break
        assert d.step(i).input == {"v": blob}
        d.apply(reply_to(d.in_flight, output={}))
    else:
        raise AssertionError("the saga's input limit was never reached")
    assert d.step(i).error is not None
    assert d.step(i).error.endswith(f"the saga's inputs would pass {MAX_SAGA_INPUT_BYTES} bytes")
    assert sum(json_size(s.input) for s in d.saga.steps) <= MAX_SAGA_INPUT_BYTES
