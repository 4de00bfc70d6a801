"""The CLI's tables and watch lines: what each column says, for each kind of step."""

from __future__ import annotations

from coordinator.cli.client import history_line
from coordinator.cli.render import (
    EVENT_WIDTH,
    attempts,
    event_width,
    progress,
    result,
    sagas_table,
    step_table,
)
from sagaplane import structs
from sagaplane.v1 import saga_pb2

St = saga_pb2.StepStatus


def step(name: str = "s", **fields: object) -> saga_pb2.Step:
    output = fields.pop("output", None)
    made = saga_pb2.Step(name=name, action=f"{name}.do", **fields)  # type: ignore[arg-type]
    if output is not None:
        made.output.CopyFrom(structs.to_struct(output))
    return made


def test_attempts_say_which_are_the_undos() -> None:
    assert attempts(step(attempts=2)) == "2"
    assert attempts(step(attempts=1, compensation_attempts=7)) == "1, undo 7"


def test_a_compensated_step_shows_that_it_was_undone_not_an_old_error() -> None:
    undone = step(
        status=St.STEP_STATUS_COMPENSATED,
        compensation="s.undo",
        attempts=1,
        compensation_attempts=7,
        error="compensation attempt 6 timed out after 10s",
        output={"order_id": 2},
    )
    assert result(undone) == 'undone after 7 attempts; output was {"order_id": 2}'
    first_time = step(status=St.STEP_STATUS_COMPENSATED, compensation_attempts=1)
    assert result(first_time) == "undone"


def test_each_status_says_what_happened() -> None:
    cases = [
        (step(status=St.STEP_STATUS_COMPLETED, output={"ok": True}), '{"ok": true}'),
        # Completed after a retry: its output, not the error of the attempt before.
        (step(status=St.STEP_STATUS_COMPLETED, error="busy", output={"ok": 1}), '{"ok": 1}'),
        (step(status=St.STEP_STATUS_FAILED, error="card declined"), "error: card declined"),
        (step(status=St.STEP_STATUS_RETRYING, error="busy"), "error: busy"),
        (step(status=St.STEP_STATUS_STARTED, attempts=2, error="busy"), "last error: busy"),
        (step(status=St.STEP_STATUS_STARTED, attempts=1), ""),
        (step(status=St.STEP_STATUS_PENDING), ""),
        (step(status=St.STEP_STATUS_SKIPPED), ""),
        (step(status=St.STEP_STATUS_COMPENSATING, compensation_attempts=1), "undoing"),
        (
            step(status=St.STEP_STATUS_COMPENSATING, compensation_attempts=2, error="down"),
            "undoing (last undo error: down)",
        ),
        (
            step(status=St.STEP_STATUS_COMPENSATION_RETRYING, error="down"),
            "undo failed, retrying: down",
        ),
        (step(status=St.STEP_STATUS_COMPENSATION_FAILED, error="gone"), "undo failed: gone"),
    ]
    for shown, expected in cases:
        assert result(shown) == expected, shown


def test_the_step_table_uses_the_attempts_and_result_columns() -> None:
    saga = saga_pb2.Saga(
        steps=[
            step("create", status=St.STEP_STATUS_COMPENSATED, compensation="create.undo",
                 attempts=1, compensation_attempts=2, error="broker down"),
            step("charge", status=St.STEP_STATUS_FAILED, attempts=3, error="declined",
                 depends_on=["create"]),
        ]
    )  # fmt: skip
    header, first, second = step_table(saga).splitlines()
    assert header.split()[-2:] == ["ATTEMPTS", "RESULT"]
    assert first.endswith("compensated  1, undo 2  undone after 2 attempts")
    assert second.endswith("failed       3          error: declined")


def saga_with(state: int, *statuses: int) -> saga_pb2.Saga:
    return saga_pb2.Saga(
        id="01J",
        name="n",
        state=state,  # type: ignore[arg-type]
        steps=[
            step(f"s{i}", status=status, compensation=f"s{i}.undo")  # type: ignore[arg-type]
            for i, status in enumerate(statuses)
        ],
    )


def test_done_counts_the_steps_that_are_done() -> None:
    running = saga_with(
        saga_pb2.SAGA_STATE_STARTED,
        St.STEP_STATUS_COMPLETED,
        St.STEP_STATUS_SKIPPED,
        St.STEP_STATUS_STARTED,
        St.STEP_STATUS_PENDING,
    )
    assert progress(running) == "2/4"
    # Being undone: how many of the steps to undo are undone, not one being undone.
    undoing = saga_with(
        saga_pb2.SAGA_STATE_COMPENSATING,
        St.STEP_STATUS_COMPLETED,  # waits for its undo
        St.STEP_STATUS_COMPENSATING,
        St.STEP_STATUS_COMPENSATED,
        St.STEP_STATUS_FAILED,  # failed for sure: nothing to undo
        St.STEP_STATUS_SKIPPED,
    )
    assert progress(undoing) == "1/3 undone"
    table = sagas_table([undoing], now=None)  # type: ignore[arg-type]
    assert table.splitlines()[1].split()[3:5] == ["1/3", "undone"]


def entry(event: str, step_name: str = "create") -> saga_pb2.HistoryEntry:
    return saga_pb2.HistoryEntry(event=event, step_name=step_name)


def test_long_event_names_do_not_shift_the_step_column() -> None:
    events = [
        "saga_started", "step_dispatched", "step_attempt_failed", "compensation_attempt_failed",
        "compensation_resolved_retry", "saga_compensation_failed",
    ]  # fmt: skip
    lines = [history_line(entry(e), None) for e in events]
    assert {line.index("create") for line in lines} == {2 + 9 + 2 + EVENT_WIDTH + 1}

    # A watch that begins with an operator's (longer) resolution makes room for it.
    began = [entry("saga_compensation_failed"), entry("compensation_resolved_mark_compensated")]
    width = event_width(began)
    assert width == len("compensation_resolved_mark_compensated")
    wide = [history_line(e, None, event_width=width) for e in [*began, entry("step_compensated")]]
    assert len({line.index("create") for line in wide}) == 1
