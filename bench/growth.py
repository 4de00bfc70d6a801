"""Cost as the work grows (issue 21, item 4): ``--phases steps``, ``context``, ``waiting``.

- steps: sagas of 3, 20 and 100 steps in a line, offered at the same steps/s (below
  capacity): CPU per step and latency per step; the ratio N-step / 3-step CPU per step.
- context: the standard saga with a 1 KB and a 64 KB context at the same sagas/s: CPU
  per saga; the ratio 64 KB / 1 KB.
- waiting: sagas in flight waiting on a participant that is stopped: the coordinator's
  idle CPU, StartSaga and GetSaga p99 while they wait against the same calls on an idle
  coordinator, and how fast the backlog drains when the participant starts again, as a
  fraction of a closed loop's sagas/s on the same system.

The pure parts (CPU per unit of work, ratios, targets) are here; the runs are in
``bench/cli.py``, beside the other phases.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import psycopg

from bench.infra import Meter
from bench.observability import histogram
from bench.starts import all_relayed
from bench.stats import ratio, summary_ms
from bench.workload import start_request
from sagaplane import SagaClient
from sagaplane.testing import Child

STEPS_BUDGET = 1.25
"""Issue 21: CPU per step of 20-step sagas at most this many times that of 3-step sagas."""
CONTEXT_BUDGET = 1.5
"""Issue 21: CPU per saga with a 64 KB context at most this many times that with 1 KB."""
IDLE_CPU_BUDGET_PCT = 5.0
"""Issue 21: the coordinator's CPU with the sagas waiting, in % of one core."""
CALLS_BUDGET = 1.5
"""Issue 21: StartSaga and GetSaga p99 while the sagas wait, against an idle coordinator."""
DRAIN_TARGET = 0.8
"""Issue 21: the backlog drains at least at this fraction of the throughput figure."""

TIMER_ROUNDS = "sagaplane_timer_round_seconds"
"""The coordinator's histogram of its timer loop's rounds (read in the waiting phase)."""

STOPPED = "orders"
"""The participant stopped in the waiting phase: the first step's, so every saga waits
on its first command."""


def counts(text: str) -> list[int]:
    """``"3,20,100"`` as ints, in the order given."""
    return [int(x) for x in str(text).split(",") if x.strip()]


ROLES = ("harness", "postgres", "rabbitmq", "coordinator", "participant")
"""What a process's name says it is, for CPU per step by role (the first that matches:
"postgres: coordinator" is PostgreSQL's)."""


def per_work(cpu_s: Mapping[str, float], *, steps_executed: int, steps: int) -> dict[str, Any]:
    """CPU per step (ms) of the processes in ``cpu_s`` (CPU seconds by name; names with
    "harness" in them are the load generator's, left out) over the steps they executed,
    and per saga of ``steps`` steps: counted by steps, a saga the run did not see end
    weighs what it did."""
    total = sum(s for name, s in cpu_s.items() if "harness" not in name)
    per_step = 1000 * total / max(1, steps_executed)
    roles: dict[str, float] = {}
    for name, seconds in cpu_s.items():
        role = next((r for r in ROLES if r in name), "other")
        roles[role] = roles.get(role, 0.0) + seconds
    return {
        "cpu_s": {name: round(s, 3) for name, s in cpu_s.items()},
        "cpu_ms_per_step_by_role": {
            role: round(1000 * s / max(1, steps_executed), 3) for role, s in roles.items()
        },
        "steps_executed": steps_executed,
        "cpu_ms_per_saga": round(per_step * steps, 3),
        "cpu_ms_per_step": round(per_step, 3),
    }


def steps_ratios(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each run's CPU per step and p50 per step against the first run's (the 3 steps)."""
    if not runs:
        return {"cpu_per_step_ratio": {}, "p50_per_step_ratio": {}}
    base = runs[0]
    return {
        "cpu_per_step_ratio": {
            str(r["steps"]): ratio(r["cpu_ms_per_step"], base["cpu_ms_per_step"]) for r in runs[1:]
        },
        "p50_per_step_ratio": {
            str(r["steps"]): ratio(per_step(r), per_step(base)) for r in runs[1:]
        },
    }


def per_step(run: Mapping[str, Any]) -> float | None:
    """The run's start->terminal p50 per step of its sagas (ms)."""
    p50 = (run.get("start_to_terminal_ms") or {}).get("p50")
    return None if p50 is None else round(p50 / run["steps"], 3)


def context_ratios(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last run's CPU per saga (the largest context) against the first's."""
    if len(runs) < 2:
        return {"cpu_per_saga_ratio": None}
    return {"cpu_per_saga_ratio": ratio(runs[-1]["cpu_ms_per_saga"], runs[0]["cpu_ms_per_saga"])}


def waiting_ratios(
    figures: Mapping[str, Any], reference_per_s: float | None, throughput_per_s: float | None
) -> dict[str, Any]:
    """The waiting phase's ratios: calls while waiting / idle (p99), and the drain's
    sagas/s against the phase's own closed loop (and the throughput phase's, if it ran)."""
    idle, busy = figures["calls_idle"], figures["calls_waiting"]
    drained = figures["drain"]["sagas_per_s"]
    return {
        "start_saga_p99_ratio": ratio(busy["start_saga_ms"]["p99"], idle["start_saga_ms"]["p99"]),
        "get_saga_p99_ratio": ratio(busy["get_saga_ms"]["p99"], idle["get_saga_ms"]["p99"]),
        "drain_vs_reference": ratio(drained, reference_per_s),
        "drain_vs_throughput": ratio(drained, throughput_per_s),
    }


def targets(results: Mapping[str, Any]) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """Issue 21's targets for these phases: (target, measured, met, the run it is from)."""
    out: list[tuple[str, str, bool, dict[str, Any]]] = []
    steps = results.get("steps")
    if steps:
        runs = {str(r["steps"]): r for r in steps["runs"]}
        for n, value in steps["cpu_per_step_ratio"].items():
            if n != "20":
                continue  # the target names 20 steps; 100 is printed, not judged
            out.append(
                (
                    f"{n}-step sagas: CPU per step within {STEPS_BUDGET}x of 3-step sagas",
                    f"{runs['3']['cpu_ms_per_step']} -> {runs[n]['cpu_ms_per_step']} ms (x{value})",
                    value is not None and value <= STEPS_BUDGET,
                    {"disturbed": runs["3"]["disturbed"] + runs[n]["disturbed"]},
                )
            )
    context = results.get("context")
    if context and context["cpu_per_saga_ratio"] is not None:
        lo, hi = context["runs"][0], context["runs"][-1]
        value = context["cpu_per_saga_ratio"]
        out.append(
            (
                f"{hi['context_bytes']:,} B contexts: CPU per saga within"
                f" {CONTEXT_BUDGET}x of {lo['context_bytes']:,} B",
                f"{lo['cpu_ms_per_saga']} -> {hi['cpu_ms_per_saga']} ms (x{value})",
                value <= CONTEXT_BUDGET,
                {"disturbed": lo["disturbed"] + hi["disturbed"]},
            )
        )
    waiting = results.get("waiting")
    if waiting:
        n = f"{waiting['sagas']:,} waiting sagas"
        idle = waiting["idle"]["coordinator_cpu_pct_of_core"]
        out.append(
            (
                f"{n}: coordinator idle CPU < {IDLE_CPU_BUDGET_PCT:g}% of a core",
                f"{idle}%",
                idle < IDLE_CPU_BUDGET_PCT,
                waiting,
            )
        )
        for key, name in (("start_saga", "StartSaga"), ("get_saga", "GetSaga")):
            value = waiting[f"{key}_p99_ratio"]
            out.append(
                (
                    f"{n}: {name} p99 within {CALLS_BUDGET}x of an idle coordinator",
                    f"{waiting['calls_idle'][f'{key}_ms']['p99']} ->"
                    f" {waiting['calls_waiting'][f'{key}_ms']['p99']} ms (x{value})",
                    value is not None and value <= CALLS_BUDGET,
                    waiting,
                )
            )
        value = waiting["drain_vs_reference"]
        out.append(
            (
                f"{n}: the backlog drains at >= {DRAIN_TARGET:.0%} of the throughput figure",
                f"{waiting['drain']['sagas_per_s']}/s against"
                f" {waiting['reference']['sagas_per_s']}/s (x{value})",
                value is not None and value >= DRAIN_TARGET,
                waiting,
            )
        )
    return out


# -- the waiting phase's measurement -------------------------------------------------------


async def _idle(coordinator: Child, seconds: float, metrics_port: int) -> dict[str, Any]:
    """The coordinator left alone for ``seconds``: its CPU, and its timer loop's rounds
    (how many, and their mean time: the query for due timers over every saga waiting)."""
    meter = Meter({"coordinator": coordinator.pid})
    count0, sum0 = await histogram(metrics_port, TIMER_ROUNDS)
    meter.start()
    await asyncio.sleep(seconds)
    used = await meter.stop()
    count1, sum1 = await histogram(metrics_port, TIMER_ROUNDS)
    cpu = used["processes"]["coordinator"]
    rounds = count1 - count0
    return {
        "seconds": round(used["wall_s"], 3),
        "coordinator_cpu_s": cpu["cpu_s"],
        "coordinator_cpu_pct_of_core": round(100 * cpu["cpu_s"] / used["wall_s"], 2),
        "coordinator_threads_cpu_s": cpu["threads_cpu_s"],
        "coordinator_peak_rss_mb": cpu["peak_rss_mb"],
        "machine_busy_pct": used["machine_busy_pct"],
        "timer_rounds": int(rounds),
        "timer_round_ms_mean": round(1000 * (sum1 - sum0) / rounds, 3) if rounds else None,
    }


async def _calls(
    client: SagaClient, request: Any, calls: int, rng: random.Random, ids: list[str]
) -> dict[str, Any]:
    """StartSaga ``calls`` times, then GetSaga ``calls`` times on sagas among ``ids``
    (with those just started), one call at a time; the ids started are added to ``ids``."""
    started, got = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        saga = await client.start_saga_request(request)
        started.append(time.perf_counter() - t0)
        ids.append(saga.id)
    for _ in range(calls):
        saga_id = ids[rng.randrange(len(ids))]
        t0 = time.perf_counter()
        await client.get_saga(saga_id)
        got.append(time.perf_counter() - t0)
    return {"start_saga_ms": summary_ms(started), "get_saga_ms": summary_ms(got)}


_OPEN_SAGAS = (
    "SELECT count(*) FILTER (WHERE completed_at IS NULL AND state <> 'compensation_failed'),"
    " max(completed_at) FROM sagaplane_sagas"
)


async def _drained(database_url: str, within: float) -> float | None:
    """Until no saga is left open, on one connection; the newest completed_at then
    (epoch seconds)."""
    deadline = time.monotonic() + within
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        while True:
            row = await (await c.execute(_OPEN_SAGAS)).fetchone()
            assert row is not None
            if not row[0]:
                return row[1].timestamp() if row[1] is not None else None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row[0]} sagas still not terminal after {within:g}s")
            await asyncio.sleep(0.25)


async def waiting(
    *,
    target: str,
    coordinator: Child,
    stopped: Child,
    database_url: str,
    sagas: int,
    idle_seconds: float,
    calls: int,
    restart: Callable[[], Awaitable[None]],
    progress: Callable[[str], None],
    metrics_port: int,
    chunk: int = 500,
) -> dict[str, Any]:
    """Stop ``stopped``; time the calls on the idle coordinator, and its CPU and timer
    loop over ``idle_seconds`` with nothing waiting; start ``sagas`` sagas (StartSagas,
    ``chunk`` at a time) that all wait on it; once their commands are published, the
    coordinator's CPU and timer loop over ``idle_seconds`` again, then the calls again;
    then ``restart`` the participant and time the drain until every saga has ended.
    The timer loop's rounds are read from the coordinator's ``/metrics`` on
    ``metrics_port`` (``sagaplane_timer_round_seconds``)."""
    # A step timeout longer than the phase: no timer fires on the waiting sagas.
    request = start_request()
    request.step_timeout.FromSeconds(3600)
    rng = random.Random(21)
    await stopped.stop()
    ids: list[str] = []
    async with SagaClient(target, timeout=120) as client:
        progress(
            f"waiting: {stopped.name} stopped; {calls} StartSaga + GetSaga on an idle coordinator"
        )
        calls_idle = await _calls(client, request, calls, rng, ids)
        progress(f"waiting: nothing waiting; the coordinator idle for {idle_seconds:g} s")
        empty = await _idle(coordinator, idle_seconds, metrics_port)
        progress(f"waiting: starting {sagas:,} sagas that wait on {stopped.name}")
        t0 = time.monotonic()
        for first in range(0, sagas, chunk):
            batch = await client.start_sagas([request] * min(chunk, sagas - first))
            ids.extend(s.id for s in batch)
        started_s = time.monotonic() - t0
        await all_relayed(database_url, within=max(120.0, sagas / 50))
        relayed_s = time.monotonic() - t0
        progress(
            f"waiting: {len(ids):,} sagas waiting; the coordinator idle for {idle_seconds:g} s"
        )
        idle = await _idle(coordinator, idle_seconds, metrics_port)
        progress(f"waiting: {calls} StartSaga + GetSaga with them waiting")
        calls_waiting = await _calls(client, request, calls, rng, ids)
    waited = len(ids)
    progress(f"waiting: {stopped.name} started again; draining {waited:,} sagas")
    await restart()
    began = time.time()
    newest = await _drained(database_url, max(180.0, waited / 20))
    drain_s = max(1e-9, (newest or time.time()) - began)
    return {
        "sagas": waited,
        "stopped": stopped.name,
        "start_s": round(started_s, 3),
        "relayed_s": round(relayed_s, 3),
        "empty": empty,
        "idle": idle,
        "timer_round_ratio": ratio(idle["timer_round_ms_mean"], empty["timer_round_ms_mean"]),
        "calls_idle": calls_idle,
        "calls_waiting": calls_waiting,
        "drain": {"seconds": round(drain_s, 3), "sagas_per_s": round(waited / drain_s, 1)},
        "disturbed": [],
    }
