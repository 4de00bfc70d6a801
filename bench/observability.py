"""What observability costs (``--phases observability``): the standard workload's closed
loop run three ways in one benchmark run, each on a fresh system (a coordinator and the 3
participants, fresh databases): metrics off; metrics on, every process's ``/metrics``
scraped every ``--scrape-interval`` seconds; tracing on, spans exported to a file (the
processes' logs). Each variant's sagas/s is compared with metrics off, against the
budgets of issue 20: metrics at most 5%, tracing at most 20%.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.stats import summary_ms

VARIANTS = ("off", "metrics", "tracing")
BUDGETS = {"metrics": 0.05, "tracing": 0.20}
"""The most sagas/s each variant may cost against metrics off (a fraction)."""

TRACING_MISSING = "tracing: not available (install sagaplane[otel])"

TRACING_SILENT = (
    "tracing: the processes exported no spans (see --tracing-env): not compared with off"
)

TRACING_ENV = {
    # The OpenTelemetry SDK's own variables; the console exporter writes each span as
    # JSON to the process's stdout, which the harness keeps in the run's folder: a file.
    "OTEL_TRACES_EXPORTER": "console",
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
    "OTEL_SDK_DISABLED": "false",
}
"""Environment of the tracing variant's processes (``--tracing-env`` adds or replaces),
on top of every ``OTEL_*`` and ``SAGAPLANE_TRACING*`` variable of the harness's own."""

QUIET = {
    "SAGAPLANE_METRICS_LISTEN": "",
    "SAGAPLANE_PARTICIPANT_METRICS_LISTEN": "",
    "OTEL_SDK_DISABLED": "true",
}
"""What turns both off (the processes inherit the harness's environment)."""


def tracing_available() -> bool:
    """Whether the OpenTelemetry SDK can be imported (the same venv runs the processes)."""
    try:
        import opentelemetry.sdk  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def tracing_env(extra: Sequence[str]) -> dict[str, str]:
    """The tracing variant's environment: :data:`TRACING_ENV`, the harness's ``OTEL_*``
    and ``SAGAPLANE_TRACING*`` variables, then ``KEY=VALUE`` items of ``--tracing-env``."""
    env = dict(TRACING_ENV)
    env |= {k: v for k, v in os.environ.items() if k.startswith(("OTEL_", "SAGAPLANE_TRACING"))}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tracing-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


@dataclass
class Scraper:
    """GETs ``/metrics`` of every port every ``interval`` seconds, as Prometheus would
    (on the harness's loop, without blocking it), and times each scrape."""

    ports: Sequence[int]
    interval: float
    scrapes: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    body_bytes: int = 0
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Scraper:
        self._task = asyncio.create_task(self._run(), name="bench-scraper")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            await asyncio.gather(*(self._scrape(port) for port in self.ports))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - began)))

    async def _scrape(self, port: int) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
                await writer.drain()
                response = await reader.read()
                writer.close()
        except (OSError, TimeoutError) as exc:
            self.failures.append(f"port {port}: {type(exc).__name__}: {exc}")
            return
        if not response.startswith(b"HTTP/1.0 200"):
            self.failures.append(f"port {port}: {response[:40]!r}")
            return
        self.scrapes.append(time.monotonic() - t0)
        self.body_bytes = max(self.body_bytes, len(response))

    def figures(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval,
            "targets": len(self.ports),
            "scrapes": len(self.scrapes),
            "failures": len(self.failures),
            "failure_examples": self.failures[:3],
            "scrape_ms": summary_ms(self.scrapes),
            "largest_response_bytes": self.body_bytes,
        }


Run = Callable[
    [str, Mapping[str, str], Sequence[Mapping[str, str]], list[int]], Awaitable[dict[str, Any]]
]
"""Runs one variant: (name, the coordinator's environment, each participant's in start
order, the metrics ports to scrape) -> its closed loop's figures (with ``sagas_per_s``)."""


async def measure(
    run: Run,
    *,
    free_port: Callable[[], int],
    tracing: Sequence[str],
    services: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The three variants one after the other, and their ratios against metrics off."""
    variants: dict[str, dict[str, Any]] = {}
    progress("observability: metrics off")
    variants["off"] = await run("off", QUIET, [QUIET] * services, [])

    ports = [free_port() for _ in range(1 + services)]
    coordinator = {**QUIET, "SAGAPLANE_METRICS_LISTEN": f"127.0.0.1:{ports[0]}"}
    participants = [
        {**QUIET, "SAGAPLANE_PARTICIPANT_METRICS_LISTEN": f"127.0.0.1:{p}"} for p in ports[1:]
    ]
    progress("observability: metrics on, scraped")
    variants["metrics"] = await run("metrics", coordinator, participants, ports)

    skipped: str | None = None
    if tracing_available():
        env = {**QUIET, **tracing_env(tracing)}
        progress("observability: tracing on (spans to each process's log)")
        variants["tracing"] = await run("tracing", env, [env] * services, [])
        if not variants["tracing"].get("spans"):
            # Nothing traced: the ratio would be metrics off's against itself.
            skipped = TRACING_SILENT
            progress(TRACING_SILENT)
    else:
        skipped = TRACING_MISSING
        progress(TRACING_MISSING)
    compared = {k: v for k, v in variants.items() if k != "tracing" or v.get("spans")}
    return {"variants": variants, "skipped": skipped, **verdicts(compared)}


def verdicts(variants: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each variant's sagas/s against metrics off: the cost, and whether it is within
    its budget."""
    base = variants.get("off", {}).get("sagas_per_s")
    out: dict[str, Any] = {"ratios": {}, "within_budget": {}}
    for name, budget in BUDGETS.items():
        got = variants.get(name, {}).get("sagas_per_s")
        if not base or got is None:
            continue
        ratio = round(got / base, 3)
        out["ratios"][name] = ratio
        out["within_budget"][name] = ratio >= 1 - budget
    return out


def render(o: Mapping[str, Any]) -> list[str]:
    """The report's lines for the phase."""
    variants = o["variants"]
    lines = [
        "",
        "Observability's cost (closed loop, the same sagas and concurrency each; a fresh "
        "system each)",
    ]
    header = f"  {'variant':<10} {'sagas/s':>9} {'vs off':>7} {'CPU ms/saga':>12}  notes"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for name in VARIANTS:
        v = variants.get(name)
        if v is None:
            continue
        ratio = o["ratios"].get(name)
        notes = []
        if name in BUDGETS and ratio is not None:
            budget = BUDGETS[name]
            ok = o["within_budget"][name]
            cost = 100 * (1 - ratio)
            notes.append(
                f"costs {cost:.1f}% (budget {100 * budget:.0f}%): "
                + ("within" if ok else "OVER BUDGET")
            )
        scraper = v.get("scraper")
        if scraper:
            notes.append(
                f"{scraper['scrapes']} scrapes of {scraper['targets']} targets every "
                f"{scraper['interval_s']:g} s, p99 {scraper['scrape_ms']['p99']} ms, "
                f"{scraper['failures']} failed"
            )
        if name == "tracing":
            notes.append(f"{v.get('spans', 0)} spans exported")
        if v.get("not_completed"):
            notes.append(f"{v['not_completed']} not completed")
        cpu = v.get("cpu_ms_per_saga")
        lines.append(
            f"  {name:<10} {v['sagas_per_s']:>9,.1f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>7} "
            f"{'-' if cpu is None else f'{cpu:.2f}':>12}  {'; '.join(notes)}"
        )
        lines += [f"  !! {name} DISTURBED (not valid): {d}" for d in v.get("disturbed") or []]
    if o.get("skipped"):
        lines.append(f"  {o['skipped']}")
    return lines
