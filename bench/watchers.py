"""``--phases watchers``: what WatchSaga streams cost the coordinator (see bench/README.md).

The standard closed loop (``--concurrency`` sagas in flight, 200 by default) run three
times on the same system: without watchers, with one WatchSaga stream per saga in
flight (each opened as soon as its StartSaga returns and read to the saga's end, as
``sagaplane start --watch`` and ``SagaClient.wait`` do: ``--concurrency`` concurrent
watchers), and without again. The coordinator's CPU per saga with watchers is set
against the mean of the two runs without, so that drift over the phase does not count
as the watchers' cost. The watchers run in the harness process, on one channel of
their own; their CPU is not the coordinator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any

from sagaplane import SagaClient
from sagaplane.errors import SagaplaneError


@dataclass
class Watchers:
    """One WatchSaga stream per saga handed to :meth:`started`, each read to its end."""

    target: str
    _client: SagaClient | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    streams: int = 0
    """Streams opened."""
    messages: int = 0
    """Messages received over all streams (the saga, then one per transition)."""
    ended: int = 0
    """Streams that reached the saga's end."""
    errors: list[str] = field(default_factory=list)
    peak: int = 0
    """The most streams open at once."""

    async def __aenter__(self) -> Watchers:
        self._client = SagaClient(self.target, timeout=120.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def started(self, saga_id: str) -> None:
        """Open a stream on ``saga_id`` (called as each StartSaga returns)."""
        task = asyncio.create_task(self._watch(saga_id), name=f"watch-{saga_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.streams += 1
        self.peak = max(self.peak, len(self._tasks))

    async def _watch(self, saga_id: str) -> None:
        assert self._client is not None
        try:
            async for saga in self._client.watch(saga_id, history=False):
                self.messages += 1
                if saga.ended:
                    self.ended += 1
                    return
        except SagaplaneError as exc:
            if len(self.errors) < 20:
                self.errors.append(f"{saga_id}: {exc}")

    async def drain(self, within: float = 30.0) -> None:
        """Until every stream has ended (the closed loop saw every saga end already)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._tasks:
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def figures(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "peak_concurrent": self.peak,
            "ended": self.ended,
            "messages": self.messages,
            "errors": self.errors,
        }


def coordinator_cpu_ms_per_saga(used: dict[str, Any], name: str) -> float:
    """The coordinator process's CPU per saga of one measured run (its own process; its
    PostgreSQL backends are reported apart)."""
    sagas = max(1, int(used["sagas"]))
    return round(1000 * float(used["processes"][name]["cpu_s"]) / sagas, 3)


def compare(
    runs: list[tuple[bool, tuple[dict[str, Any], dict[str, Any]]]],
    watched: Watchers,
    coordinator: str,
) -> dict[str, Any]:
    """The phase's figures from its runs in order, each (with watchers?, (figures,
    resources)), runs without and with watchers alternating and without first and last:
    each run's throughput and coordinator CPU, and the cost. Each run with watchers is
    set against the mean of the runs without on either side of it (drift over the phase
    does not count as cost), and the median of those pairs is the cost."""
    cpu = [coordinator_cpu_ms_per_saga(used, coordinator) for _, (_, used) in runs]
    pct = [used["processes"][coordinator]["cpu_pct"] for _, (_, used) in runs]
    rate = [figures["sagas_per_s"] for _, (figures, _) in runs]
    increases, extras, ratios = [], [], []
    for i, (with_watchers, _) in enumerate(runs):
        if not with_watchers:
            continue
        around = [j for j in (i - 1, i + 1) if 0 <= j < len(runs) and not runs[j][0]]
        base_cpu = sum(cpu[j] for j in around) / len(around)
        base_pct = sum(pct[j] for j in around) / len(around)
        base_rate = sum(rate[j] for j in around) / len(around)
        increases.append(100 * (cpu[i] - base_cpu) / base_cpu)
        extras.append(pct[i] - base_pct)
        ratios.append(rate[i] / base_rate if base_rate else 0.0)
    return {
        "runs": [
            {
                "watchers": with_watchers,
                "sagas_per_s": figures["sagas_per_s"],
                "p50_ms": figures["start_to_terminal_ms"]["p50"],
                "coordinator_cpu_ms_per_saga": cpu[i],
                "coordinator_cpu_pct": pct[i],
                # Where the coordinator's CPU went: its threads (main: the event loop).
                "coordinator_threads_ms_per_saga": {
                    thread: round(1000 * seconds / max(1, used["sagas"]), 3)
                    for thread, seconds in used["processes"][coordinator]
                    .get("threads_cpu_s", {})
                    .items()
                },
                "disturbed": figures["disturbed"],
            }
            for i, (with_watchers, (figures, used)) in enumerate(runs)
        ],
        "watchers": watched.figures(),
        # Relative: how much more CPU a saga costs the coordinator with watchers.
        "coordinator_cpu_increase_pct": round(statistics.median(increases), 1),
        "coordinator_cpu_increase_pct_by_round": [round(x, 1) for x in increases],
        # Absolute: the extra share of a core the coordinator used.
        "coordinator_cpu_extra_pct_of_core": round(statistics.median(extras), 1),
        "coordinator_cpu_extra_pct_of_core_by_round": [round(x, 1) for x in extras],
        # Absolute, per saga: the coordinator's extra CPU that one saga's stream costs.
        "coordinator_cpu_ms_per_stream": round(
            statistics.median(
                cpu[i] - sum(cpu[j] for j in (i - 1, i + 1)) / 2
                for i, (w, _) in enumerate(runs)
                if w
            ),
            3,
        ),
        "sagas_per_s_ratio": round(statistics.median(ratios), 3),
    }
