"""The web page's pure parts: the timeline read from a history, and the HTML drawn from
sagas (escaped, the graph only when there are dependencies)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coordinator.web.pages import saga_page, saga_sections
from coordinator.web.timeline import timeline
from sagaplane.sagas import Saga
from sagaplane.v1 import saga_pb2

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _saga(
    entries: list[tuple[float, str, str, str]],
    *,
    steps: list[saga_pb2.Step] | None = None,
    ended: float | None = None,
) -> Saga:
    saga = saga_pb2.Saga(id="01JE0000000000000000000000", name="order.place")
    saga.created_at.FromDatetime(T0)
    if ended is not None:
        saga.completed_at.FromDatetime(T0 + timedelta(seconds=ended))
    saga.steps.extend(steps or [])
    for i, (at, event, step, reason) in enumerate(entries, 1):
        entry = saga.history.add(event=event, step_name=step, reason=reason, position=i)
        entry.at.FromDatetime(T0 + timedelta(seconds=at))
    return Saga.from_proto(saga)


def test_each_attempt_is_a_span_from_dispatch_to_its_reply() -> None:
    saga = _saga(
        [
            (0, "saga_started", "", ""),
            (0, "step_dispatched", "pay", ""),
            (1, "step_attempt_failed", "pay", "declined (attempt 1; retry in 1s)"),
            (2, "step_dispatched", "pay", "attempt 2"),
            (3, "step_failed", "pay", "declined"),
            (3, "compensation_dispatched", "create", ""),
            (4, "step_compensated", "create", ""),
            (4, "step_skipped", "gift", "when false"),
        ],
        ended=4,
    )
    line = timeline(saga, now=T0 + timedelta(hours=1))
    shown = [(s.step, s.kind, s.attempt, s.outcome) for s in line.spans]
    assert shown == [
        ("pay", "execute", 1, "retried"),
        ("pay", "execute", 2, "failed"),
        ("create", "compensate", 1, "succeeded"),
    ]
    assert line.spans[0].reason.startswith("declined")
    assert line.skipped == ("gift",)
    assert line.end == T0 + timedelta(seconds=4)  # the saga's end, not now
    assert line.offset(T0 + timedelta(seconds=1)) == 25.0


def test_an_attempt_in_flight_runs_until_now() -> None:
    saga = _saga([(0, "saga_started", "", ""), (1, "step_dispatched", "create", "")])
    now = T0 + timedelta(seconds=5)
    (span,) = timeline(saga, now=now).spans
    assert span.outcome == "running" and span.end == now


def test_everything_from_the_saga_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    step = saga_pb2.Step(name=evil, action="a", error=evil, status=saga_pb2.STEP_STATUS_FAILED)
    step.output.update({"x": evil})
    saga = _saga([(0, "step_dispatched", evil, evil), (1, "step_failed", evil, evil)], steps=[step])
    html = saga_page(saga, T0)
    assert "<script>alert" not in html
    assert "&lt;script&gt;" in html


def test_the_graph_is_drawn_only_for_dependencies() -> None:
    line = [
        saga_pb2.Step(name="a"),
        saga_pb2.Step(name="b", depends_on=["a"]),
        saga_pb2.Step(name="c", depends_on=["b"]),
    ]
    assert saga_sections(_saga([], steps=line), T0)["graph"] == ""
    fork = [
        saga_pb2.Step(name="a"),
        saga_pb2.Step(name="b", depends_on=["a"]),
        saga_pb2.Step(name="c", depends_on=["a"]),
        saga_pb2.Step(name="d", depends_on=["b", "c"]),
    ]
    graph = saga_sections(_saga([], steps=fork), T0)["graph"]
    assert graph.count("<line ") == 4
    assert graph.count('class="node ') == 4
