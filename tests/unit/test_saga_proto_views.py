"""WatchSaga's successive views of one saga (coordinator.api.convert.SagaViews): what it
converts again only when something changed must equal a whole conversion every time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from engine_helpers import Tokens, at, reply_to, specs, start_saga
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from coordinator.api import convert
from coordinator.engine import apply
from sagaplane.v1 import saga_pb2


def test_every_view_equals_a_whole_conversion_as_the_saga_moves() -> None:
    tokens = Tokens()
    t = start_saga(specs(True, True, True), tokens=tokens, context={"order": 7, "big": "x" * 500})
    views = convert.SagaViews()
    saga, seen = t.saga, [saga_pb2.Saga()]
    seen[0].CopyFrom(views.view(saga))
    assert seen[0] == convert.saga_to_proto(saga)
    outputs = [{"id": 1}, {"ok": True}, None]
    for n, output in enumerate(outputs):
        [command] = t.commands
        ok = output is not None
        t = apply(
            saga,
            reply_to(command, ok=ok, output=output, error=None if ok else "no"),
            now=at(n + 1),
            new_token=tokens,
        )
        saga = t.saga
        view = views.view(saga)
        assert view == convert.saga_to_proto(saga)
        seen.append(saga_pb2.Saga())
        seen[-1].CopyFrom(view)
        if not t.commands:
            break
    # The failure compensates: the steps' statuses moved, and each view showed it.
    assert [s.status for s in seen[-1].steps] != [s.status for s in seen[0].steps]


def test_a_changed_context_or_step_is_converted_again() -> None:
    t = start_saga(specs(True, True))
    views = convert.SagaViews()
    views.view(t.saga)
    changed = replace(t.saga, context={"customer": "c2"})
    assert views.view(changed).context == convert.saga_to_proto(changed).context
    step = replace(t.saga.steps[1], delivery_problem="command not delivered: nobody")
    moved = replace(changed, steps=(t.saga.steps[0], step))
    assert views.view(moved) == convert.saga_to_proto(moved)
    assert views.view(moved).steps[1].delivery_problem.startswith("command not delivered")


@given(
    st.datetimes(
        # A day inside the range datetime can hold, so that every time zone can reach UTC.
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30, 23, 59, 59, 999999),
        timezones=st.none() | st.just(UTC) | st.timezones(),
    )
)
def test_timestamps_are_what_protobufs_own_conversion_gives(value: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert convert._timestamp(value) == expected
