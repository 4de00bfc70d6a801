"""``--phases peers``: Sagaplane beside a real peer, DBOS Transact, in the same run.

The peer (:mod:`bench.peer_dbos`) runs in a process of its own on fresh databases of the
same PostgreSQL, after the system under test has stopped, so that the two never share the
machine. Sagaplane's side is the throughput run (closed loop) and a latency run at
``--peer-rate`` sagas/s (5; the latency phase's own if it ran at that rate).
"""

from __future__ import annotations

import json
from typing import Any

from bench.stats import ratio

DIFFERENCES = (
    "DBOS runs the workflow in ONE process, in the caller's thread, with no broker: its"
    " 3 transactions (each recording its output in the app database) and its own"
    " bookkeeping (a system database) are all it does.",
    "Sagaplane crosses 4 databases (coordinator + one per participant) and 6 broker hops"
    " (3 commands, 3 replies, each published from an outbox with a confirm and acked), in"
    " 4 processes and RabbitMQ; the caller only starts the saga (StartSaga) and learns its"
    " end from the coordinator's database.",
    "DBOS's latency is call to return, in its process; Sagaplane's is from the scheduled"
    " send time to the saga's completed_at (open loop).",
)

TARGET_THROUGHPUT_RATIO = 4.0
"""Issue 21: Sagaplane's sagas/s at least this many times DBOS's closed-loop workflows/s."""


def compare(sagaplane: dict[str, Any], dbos: dict[str, Any]) -> dict[str, Any]:
    """The two side by side: Sagaplane's throughput and latency (``sagaplane``: the
    ``throughput`` run's figures with ``cpu_ms_per_saga``, and the ``latency`` run's)
    against the peer's figures (:mod:`bench.peer_dbos`), with the ratios."""
    closed, single = dbos["closed_loop"], dbos["one_at_a_time_ms"]
    tp, lat = sagaplane.get("throughput") or {}, sagaplane.get("latency") or {}
    lat_ms = lat.get("start_to_terminal_ms") or {}
    throughput = ratio(tp.get("sagas_per_s"), closed["workflows_per_s"])
    return {
        "throughput_ratio": throughput,
        "cpu_ratio": ratio(tp.get("cpu_ms_per_saga"), closed.get("cpu_ms_per_workflow")),
        "p50_ratio": ratio(lat_ms.get("p50"), single["p50"]),
        "p99_ratio": ratio(lat_ms.get("p99"), single["p99"]),
        "throughput_target_met": throughput is not None and throughput >= TARGET_THROUGHPUT_RATIO,
        "p50_target_met": lat_ms.get("p50") is not None and lat_ms["p50"] <= single["p50"],
    }


def commits(per_database: dict[str, dict[str, float]] | None) -> float | None:
    """Transactions committed (read-only ones too) per saga, or per workflow, over all
    the databases given (``pg_stat_database`` deltas per saga, by database)."""
    if not per_database:
        return None
    return round(sum(v.get("commits", 0.0) for v in per_database.values()), 2)


def load(path: Any) -> dict[str, Any]:
    """The peer's figures as it wrote them."""
    figures: dict[str, Any] = json.loads(path.read_text())
    return figures
