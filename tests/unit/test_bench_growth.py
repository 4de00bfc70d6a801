"""The benchmark's growth and peers phases: the sagas they start, their ratios and targets
(bench/growth.py, bench/peers.py; the runs themselves are `python -m bench`'s)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import growth, peers
from bench.workload import start_request, steps_in
from coordinator.api import validation


@pytest.mark.parametrize(("shape", "steps"), [("standard", 3), ("line20", 20), ("line100", 100)])
def test_the_coordinator_accepts_the_longest_saga_and_the_largest_context(
    shape: str, steps: int
) -> None:
    request = start_request(shape=shape, context_bytes=65000)
    spec = validation.start_request(request)
    assert len(spec.steps) == steps == steps_in(shape)
    assert len(request.steps[-1].depends_on) == 0  # a line: each step after the one before


def test_a_line_goes_round_the_three_services_and_only_its_last_step_fails() -> None:
    request = start_request(shape="line20", fail=True)
    actions = [s.action for s in request.steps]
    assert actions[:4] == ["orders.create", "inventory.reserve", "payment.charge", "orders.create"]
    fails = [s.input.fields["fail"].bool_value for s in request.steps]
    assert fails == [False] * 19 + [True]


def test_cpu_per_step_leaves_the_harness_out() -> None:
    cpu = {
        "coordinator-1": 1.0,
        "participant-orders": 1.5,
        "postgres: coordinator": 0.5,
        "harness (load + poll)": 50.0,
    }
    figures = growth.per_work(cpu, steps_executed=2000, steps=20)
    assert figures["cpu_ms_per_step_by_role"] == {
        "coordinator": 0.5,
        "participant": 0.75,
        "postgres": 0.25,
        "harness": 25.0,
    }
    assert figures["cpu_ms_per_step"] == 1.5
    assert figures["cpu_ms_per_saga"] == 30.0


def _run(steps: int, cpu_per_step: float, p50: float) -> dict[str, Any]:
    return {
        "steps": steps,
        "cpu_ms_per_step": cpu_per_step,
        "start_to_terminal_ms": {"p50": p50},
        "disturbed": [],
    }


def test_steps_are_judged_at_20_against_3() -> None:
    runs = [_run(3, 4.0, 30.0), _run(20, 4.8, 200.0), _run(100, 8.0, 1000.0)]
    found = {"steps": {"runs": runs, **growth.steps_ratios(runs)}}
    assert found["steps"]["cpu_per_step_ratio"] == {"20": 1.2, "100": 2.0}
    assert found["steps"]["p50_per_step_ratio"] == {"20": 1.0, "100": 1.0}
    [(target, measured, met, _)] = growth.targets(found)
    assert target.startswith("20-step sagas") and met
    assert measured == "4.0 -> 4.8 ms (x1.2)"


def _waiting(idle_pct: float, drain_per_s: float) -> dict[str, Any]:
    calls = {"start_saga_ms": {"p99": 10.0}, "get_saga_ms": {"p99": 4.0}}
    busy = {"start_saga_ms": {"p99": 14.0}, "get_saga_ms": {"p99": 8.0}}
    figures: dict[str, Any] = {
        "sagas": 10_000,
        "idle": {"coordinator_cpu_pct_of_core": idle_pct},
        "calls_idle": calls,
        "calls_waiting": busy,
        "drain": {"sagas_per_s": drain_per_s},
        "reference": {"sagas_per_s": 100.0},
        "disturbed": [],
    }
    figures |= growth.waiting_ratios(figures, 100.0, None)
    return figures


def test_waiting_targets() -> None:
    verdicts = {
        t[0].split(": ", 1)[1]: t[2] for t in growth.targets({"waiting": _waiting(1.0, 79.0)})
    }
    assert verdicts == {
        "coordinator idle CPU < 5% of a core": True,
        "StartSaga p99 within 1.5x of an idle coordinator": True,  # 1.4x
        "GetSaga p99 within 1.5x of an idle coordinator": False,  # 2x
        "the backlog drains at >= 80% of the throughput figure": False,  # 0.79
    }


def test_context_ratio_is_the_largest_against_the_smallest() -> None:
    runs = [
        {"context_bytes": 1024, "cpu_ms_per_saga": 10.0, "disturbed": []},
        {"context_bytes": 65000, "cpu_ms_per_saga": 16.0, "disturbed": []},
    ]
    found = {"context": {"runs": runs, **growth.context_ratios(runs)}}
    [(_, measured, met, _)] = growth.targets(found)
    assert found["context"]["cpu_per_saga_ratio"] == 1.6 and not met
    assert measured == "10.0 -> 16.0 ms (x1.6)"


def test_the_peer_comparison() -> None:
    mine = {
        "throughput": {"sagas_per_s": 120.0, "cpu_ms_per_saga": 15.0},
        "latency": {"start_to_terminal_ms": {"p50": 25.0, "p99": 40.0}},
    }
    dbos = {
        "closed_loop": {"workflows_per_s": 30.0, "cpu_ms_per_workflow": 10.0},
        "one_at_a_time_ms": {"p50": 27.0, "p99": 39.0},
    }
    found = peers.compare(mine, dbos)
    assert found["throughput_ratio"] == 4.0 and found["throughput_target_met"]
    assert found["p50_target_met"] and found["p99_ratio"] == 1.026
    assert found["cpu_ratio"] == 1.5
    assert peers.commits({"a": {"commits": 4.38}, "b": {"commits": 1.03}}) == 5.41
