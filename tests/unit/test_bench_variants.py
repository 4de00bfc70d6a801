"""The benchmark's variant comparisons (bench/variants.py): the order of the rounds,
the medians, the paired ratios and the verdicts; the runs themselves are `python -m
bench`'s."""

from __future__ import annotations

from typing import Any

import pytest

from bench import variants


def test_rounds_alternate_the_order_so_that_a_drift_weighs_on_every_variant_alike() -> None:
    assert variants.round_orders(["A", "B", "C"], 3) == [
        ["A", "B", "C"],
        ["C", "B", "A"],
        ["A", "B", "C"],
    ]
    assert variants.round_orders(["off", "on"], 1) == [["off", "on"]]
    # Over an even number of rounds every variant's positions add up to the same.
    orders = variants.round_orders(["A", "B", "C"], 4)
    assert {sum(o.index(n) for o in orders) for n in "ABC"} == {4}
    with pytest.raises(ValueError):
        variants.round_orders(["A"], 0)


def test_median_of_what_is_there() -> None:
    assert variants.median([3.0, 1.0, 2.0]) == 2.0
    assert variants.median([1.0, 2.0]) == 1.5
    assert variants.median([None, 4.0]) == 4.0
    assert variants.median([]) is None


async def test_run_rounds_runs_each_variant_once_a_round_in_the_alternating_order() -> None:
    ran: list[tuple[str, int]] = []
    said: list[str] = []

    async def run(name: str, n: int) -> dict[str, Any]:
        ran.append((name, n))
        return {"sagas_per_s": float(n)}

    runs = await variants.run_rounds(
        ["off", "on"], run, rounds=3, phase="events", progress=said.append, labels={"on": "1/step"}
    )
    assert ran == [("off", 1), ("on", 1), ("on", 2), ("off", 2), ("off", 3), ("on", 3)]
    assert list(runs) == ["off", "on"]
    assert [r["sagas_per_s"] for r in runs["on"]] == [1.0, 2.0, 3.0]
    assert said[1] == "events: round 1/3, 1/step"


def _run(speed: float, cpu: float, *, disturbed: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "sagas_per_s": speed,
        "cpu_ms_per_saga": cpu,
        "not_completed": 0,
        "disturbed": list(disturbed),
    }


def test_a_variant_is_judged_on_the_median_of_its_ratios_to_the_same_rounds_baseline() -> None:
    # The machine got busier in round 2: both runs of that round are slow. The ratio of
    # the medians (96/100) would call that a 4% cost; paired, round by round, it is 1-2%.
    runs = {
        "off": [_run(100.0, 10.0), _run(50.0, 12.0), _run(110.0, 10.0)],
        "on": [_run(99.0, 10.5), _run(49.0, 12.6), _run(96.0, 11.0)],
    }
    found = variants.compare(runs, baseline="off", budgets={"on": 0.05})
    assert found["rounds"] == 3
    assert found["order"] == [["off", "on"], ["on", "off"], ["off", "on"]]
    assert found["variants"]["off"]["sagas_per_s"] == 100.0
    assert found["variants"]["on"]["rounds_sagas_per_s"] == [99.0, 49.0, 96.0]
    assert found["variants"]["on"]["cpu_ms_per_saga"] == 11.0
    c = found["comparisons"]["on"]
    assert c["paired_sagas_per_s"] == [0.99, 0.98, 0.873]
    assert c["paired_median"] == 0.98
    assert c["ratio_of_medians"] == 0.96
    assert c["paired_cpu_per_saga"] == [1.05, 1.05, 1.1]
    assert c["cpu_increase_pct"] == 5.0
    assert found["ratios"] == {"on": 0.98}
    assert found["within_budget"] == {"on": True}
    assert c["within_budget"] and c["budget"] == 0.05
    assert c["rounds_within_budget"] == 2  # round 3 alone would have failed
    assert "within budget (2 of 3 rounds within)" in variants.verdict_text(found, "on")


def test_over_budget_and_exactly_on_it() -> None:
    runs = {
        "off": [_run(100.0, 10.0)],
        "metrics": [_run(95.0, 10.0)],
        "tracing": [_run(79.0, 13.0)],
    }
    found = variants.compare(runs, baseline="off", budgets={"metrics": 0.05, "tracing": 0.20})
    assert found["within_budget"] == {"metrics": True, "tracing": False}
    text = variants.verdict_text(found, "tracing")
    assert "median 0.790" in text and "+30.0%" in text and "OVER BUDGET" in text


def test_a_variant_left_out_is_summed_up_but_not_judged() -> None:
    runs = {"off": [_run(100.0, 10.0)], "tracing": [_run(60.0, 15.0)]}
    found = variants.compare(runs, baseline="off", budgets={"tracing": 0.2}, left_out=["tracing"])
    assert "tracing" in found["variants"]
    assert found["comparisons"] == found["ratios"] == found["within_budget"] == {}


def test_disturbances_and_sagas_not_completed_are_kept_with_their_round() -> None:
    runs = {
        "off": [_run(100.0, 10.0), _run(100.0, 10.0, disturbed=("broker went away",))],
        "on": [{**_run(90.0, 11.0), "not_completed": 2}, _run(90.0, 11.0)],
    }
    found = variants.compare(runs, baseline="off", budgets={})
    assert found["variants"]["off"]["disturbed"] == ["round 2: broker went away"]
    assert found["variants"]["on"]["not_completed"] == 2
    assert "within_budget" not in found["comparisons"]["on"]  # no budget, no verdict
    lines = variants.render(found, title="Events")
    assert any("DISTURBED" in line and "round 2" in line for line in lines)


def test_a_missing_figure_gives_no_ratio_instead_of_failing() -> None:
    runs = {"off": [_run(0.0, 10.0)], "on": [{"sagas_per_s": 5.0}]}
    found = variants.compare(runs, baseline="off", budgets={"on": 0.05})
    assert found["comparisons"]["on"]["paired_median"] is None
    assert found["comparisons"]["on"]["cpu_increase_pct"] is None
    assert found["within_budget"] == {}
    variants.render(found, title="Security")


async def test_on_against_off_keeps_the_keys_of_the_phases_from_before_the_rounds() -> None:
    speeds = {("off", 1): 100.0, ("on", 1): 88.0, ("on", 2): 80.0, ("off", 2): 90.0}

    async def run(name: str, n: int) -> dict[str, Any]:
        return _run(speeds[(name, n)], 10.0)

    found = await variants.on_against_off(
        run, budget=0.15, rounds=2, phase="events", progress=lambda _: None
    )
    assert found["comparisons"]["on"]["paired_sagas_per_s"] == [0.88, 0.889]
    assert found["ratio"] == 0.884
    assert found["budget"] == 0.15
    assert found["within_budget"] is True


def test_the_cpu_against_the_services_own_cancels_a_slower_machine() -> None:
    # Round 2 ran on a machine 20% slower: every process's CPU per saga is up 20%, ours
    # and PostgreSQL's and RabbitMQ's alike. Against theirs, the variant costs 5% in both.
    off = [_run(100.0, 10.0) | {"services_cpu_ms_per_saga": 5.0}]
    off.append(_run(90.0, 12.0) | {"services_cpu_ms_per_saga": 6.0})
    on = [_run(95.0, 12.6) | {"services_cpu_ms_per_saga": 6.0}]  # a slow round for "on"
    on.append(_run(95.0, 10.5) | {"services_cpu_ms_per_saga": 5.0})
    found = variants.compare({"off": off, "on": on}, baseline="off", budgets={"on": 0.05})
    c = found["comparisons"]["on"]
    assert c["paired_cpu_against_services"] == [1.05, 1.05]
    assert c["cpu_against_services_increase_pct"] == 5.0
    assert "against PostgreSQL's and RabbitMQ's own" in variants.verdict_text(found, "on")
    # Runs from before the figure was recorded: nothing said about it.
    old = variants.compare(
        {"off": [_run(100.0, 10.0)], "on": [_run(99.0, 10.1)]}, baseline="off", budgets={}
    )
    assert old["comparisons"]["on"]["cpu_against_services_increase_pct"] is None
