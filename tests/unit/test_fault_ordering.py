"""The fault suite's order check itself, on made-up effects: it must see a compensation
that came before an effect of a step that depends on it (or it proves nothing)."""

from __future__ import annotations

from fault.harness import _compensations_out_of_order, descendants_of, graph_order_steps

GRAPH = descendants_of(graph_order_steps(10.0))
# create=0, reserve=1, hold=2, charge=3, confirm=4 (joins 1, 2, 3)


def test_the_graph_order_knows_who_depends_on_whom() -> None:
    assert {0: {1, 2, 3, 4}, 1: {4}, 2: {4}, 3: {4}, 4: set()} == GRAPH


def test_branches_undone_in_any_order_before_their_root_are_in_order() -> None:
    effects = [
        ("s", "orders.create", "execute", 0, 1),
        ("s", "inventory.reserve", "execute", 1, 2),
        ("s", "flaky.hold", "execute", 2, 3),
        ("s", "flaky.release", "compensate", 2, 4),
        ("s", "inventory.release", "compensate", 1, 5),
        ("s", "orders.delete", "compensate", 0, 6),
    ]
    assert _compensations_out_of_order(effects, {"s": GRAPH}) == []


def test_a_root_undone_before_a_branch_is_out_of_order() -> None:
    effects = [
        ("s", "orders.create", "execute", 0, 1),
        ("s", "inventory.reserve", "execute", 1, 2),
        ("s", "orders.delete", "compensate", 0, 3),
        ("s", "inventory.release", "compensate", 1, 4),
    ]
    assert len(_compensations_out_of_order(effects, {"s": GRAPH})) == 1


def test_a_line_keeps_its_old_rule_every_later_step_first() -> None:
    effects = [
        ("s", "a", "execute", 0, 1),
        ("s", "b", "execute", 1, 2),
        ("s", "a.undo", "compensate", 0, 3),
        ("s", "b.undo", "compensate", 1, 4),
    ]
    assert len(_compensations_out_of_order(effects, {"s": None})) == 1
    # Independent branches of a graph may be undone in either order.
    branches = {0: set(), 1: set()}
    assert _compensations_out_of_order(effects, {"s": branches}) == []
