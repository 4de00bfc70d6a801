"""`sagaplane get`'s step table for sagas whose steps wait for others or have conditions."""

from __future__ import annotations

from coordinator.cli.render import step_table
from sagaplane.v1 import saga_pb2


def saga(*steps: saga_pb2.Step) -> saga_pb2.Saga:
    return saga_pb2.Saga(id="s", name="n", steps=list(steps))


def test_a_line_shows_no_after_or_when_column() -> None:
    table = step_table(
        saga(saga_pb2.Step(name="a", action="x"), saga_pb2.Step(name="b", depends_on=["a"]))
    )
    assert "AFTER" not in table and "WHEN" not in table


def test_a_graph_shows_what_each_step_waits_for_and_its_condition() -> None:
    table = step_table(
        saga(
            saga_pb2.Step(name="create", action="orders.create"),
            saga_pb2.Step(name="wrap", depends_on=["create"], when="context.gift == true",
                          status=saga_pb2.STEP_STATUS_SKIPPED),
            saga_pb2.Step(name="ship", depends_on=["create"]),
            saga_pb2.Step(name="charge", depends_on=["wrap", "ship"]),
        )
    )  # fmt: skip
    header, *rows = table.splitlines()
    assert header.split()[4:6] == ["AFTER", "WHEN"]
    assert "wrap, ship" in rows[3]
    assert "context.gift == true" in rows[1] and "skipped" in rows[1]
