"""The watchers phase's arithmetic (bench/watchers.py): each run with watchers set against
the runs without on either side of it, and the median of those pairs."""

from __future__ import annotations

from typing import Any

from bench import watchers


def run(cpu_s: float, cpu_pct: float, rate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    figures = {"sagas_per_s": rate, "start_to_terminal_ms": {"p50": 10.0}, "disturbed": []}
    used = {"sagas": 1000, "processes": {"coordinator-1": {"cpu_s": cpu_s, "cpu_pct": cpu_pct}}}
    return figures, used


def test_each_run_with_watchers_is_set_against_its_neighbours_and_the_median_taken() -> None:
    # Drift: the runs without watchers get slower over the phase (5, 6, 7 ms per saga).
    runs = [
        (False, run(5.0, 40.0, 100.0)),
        (True, run(6.6, 48.0, 90.0)),  # +20% against 5.5
        (False, run(6.0, 42.0, 100.0)),
        (True, run(7.8, 50.0, 95.0)),  # +20% against 6.5
        (False, run(7.0, 44.0, 100.0)),
    ]
    found = watchers.compare(runs, watchers.Watchers("x"), "coordinator-1")
    assert found["coordinator_cpu_increase_pct_by_round"] == [20.0, 20.0]
    assert found["coordinator_cpu_increase_pct"] == 20.0
    assert found["coordinator_cpu_extra_pct_of_core_by_round"] == [7.0, 7.0]
    assert found["coordinator_cpu_ms_per_stream"] == 1.2
    assert found["sagas_per_s_ratio"] == 0.925
    assert [r["watchers"] for r in found["runs"]] == [False, True, False, True, False]
