"""What observability costs (``--phases observability``): the standard workload's closed
loop run three ways in one benchmark run, each run on a fresh system (a coordinator and
the 3 participants, fresh databases): metrics off; metrics on, every process's
``/metrics`` scraped every ``--scrape-interval`` seconds; tracing on, spans exported to a
file (the processes' logs). The three run in ``--variant-rounds`` alternating rounds
(:mod:`bench.variants`), and each variant's sagas/s is compared with metrics off's of the
same round against the budgets of issue 20: metrics at most 5%, tracing at most 20%.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import variants
from bench.stats import summary_ms

VARIANTS = ("off", "metrics", "tracing")
BUDGETS = {"metrics": 0.05, "tracing": 0.20}
"""The most sagas/s each variant may cost against metrics off (a fraction)."""

TRACING_MISSING = "tracing: not available (install sagaplane[otel])"

TRACING_SILENT = (
    "tracing: the processes exported no spans (see --tracing-env): not compared with off"
)

TRACING_ENV = {
    # Spans go to a file per process (sagaplane.tracing's SAGAPLANE_TRACES_FILE: one JSON
    # line per span, written by the SDK's batch span processor), as issue 20 asks ("to a
    # file exporter"). The console exporter (OTEL_TRACES_EXPORTER=console, pretty JSON on
    # stdout) is a debugging aid: its formatting and the pipe to the harness, which reads
    # and logs every line, cost more than tracing itself (--tracing-env selects it).
    "OTEL_TRACES_EXPORTER": "none",
    "OTEL_METRICS_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
    "OTEL_SDK_DISABLED": "false",
}
"""Environment of the tracing variant's processes (``--tracing-env`` adds or replaces),
on top of every ``OTEL_*`` and ``SAGAPLANE_TRACING*`` variable of the harness's own; each
process also gets its own ``SAGAPLANE_TRACES_FILE`` in the run's folder."""

TRACES_FILE = "SAGAPLANE_TRACES_FILE"

QUIET = {
    "SAGAPLANE_METRICS_LISTEN": "",
    "SAGAPLANE_PARTICIPANT_METRICS_LISTEN": "",
    "OTEL_SDK_DISABLED": "true",
}
"""What turns both off (the processes inherit the harness's environment)."""


@dataclass
class SpanFiles:
    """The span files of a system's processes (their ``SAGAPLANE_TRACES_FILE``), and how
    far each had been written when this was made."""

    sizes: dict[Path, int]

    def lines_since(self) -> int:
        """Spans (lines) appended to the files since then. The batch span processor
        exports every few seconds: call it after the processes flushed (stopped), or
        accept that the last seconds' spans may not be counted yet."""
        count = 0
        for path, size in self.sizes.items():
            with contextlib.suppress(OSError), path.open("rb") as f:
                f.seek(size)
                count += f.read().count(b"\n")
        return count


def span_files(processes: Iterable[Any]) -> SpanFiles:
    """The span files named in the environments of ``processes`` (Child objects)."""
    sizes: dict[Path, int] = {}
    for process in processes:
        name = (getattr(process, "env", None) or {}).get(TRACES_FILE)
        if name:
            path = Path(name)
            sizes[path] = path.stat().st_size if path.exists() else 0
    return SpanFiles(sizes)


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


async def get_metrics(port: int) -> bytes:
    """The whole HTTP response (status line, headers, body) of ``GET /metrics`` on
    ``127.0.0.1:port``; OSError, or TimeoutError after 10 s, when it cannot be had."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        writer.close()
    return response


async def histogram(port: int, name: str) -> tuple[float, float]:
    """``(count, sum)`` of the unlabelled histogram ``name`` at ``/metrics`` of ``port``
    (0, 0 when the process does not export it)."""
    response = await get_metrics(port)
    _, _, body = response.partition(b"\r\n\r\n")
    count = total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == f"{name}_count":
                count = sample.value
            elif sample.name == f"{name}_sum":
                total = sample.value
    return count, total


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
            response = await get_metrics(port)
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
    [str, int, Mapping[str, str], Sequence[Mapping[str, str]], list[int]],
    Awaitable[dict[str, Any]],
]
"""Runs one variant on a fresh system: (name, round, the coordinator's environment, each
participant's in start order, the metrics ports to scrape) -> its closed loop's figures
(with ``sagas_per_s``, ``cpu_ms_per_saga``, ``spans`` and, when scraped, ``scraper``)."""

LABELS = {
    "off": "metrics off",
    "metrics": "metrics on, scraped",
    "tracing": "tracing on (spans to a file per process)",
}


def settings(
    name: str,
    *,
    free_port: Callable[[], int],
    tracing: Sequence[str],
    services: int,
    spans: Path | None = None,
) -> tuple[dict[str, str], list[dict[str, str]], list[int]]:
    """A variant's environments (the coordinator's, each participant's) and the metrics
    ports to scrape; fresh ports and span files (in ``spans``, a folder) at every call
    (every run is a fresh system)."""
    if name == "metrics":
        ports = [free_port() for _ in range(1 + services)]
        coordinator = {**QUIET, "SAGAPLANE_METRICS_LISTEN": f"127.0.0.1:{ports[0]}"}
        participants = [
            {**QUIET, "SAGAPLANE_PARTICIPANT_METRICS_LISTEN": f"127.0.0.1:{p}"} for p in ports[1:]
        ]
        return coordinator, participants, ports
    if name == "tracing":
        env = {**QUIET, **tracing_env(tracing)}
        if spans is None or TRACES_FILE in env:
            return env, [env] * services, []
        run = f"spans-{uuid.uuid4().hex[:8]}"
        files = [spans / f"{run}-{role}.jsonl" for role in ("coordinator", *range(services))]
        coordinator = {**env, TRACES_FILE: str(files[0])}
        return coordinator, [{**env, TRACES_FILE: str(f)} for f in files[1:]], []
    return dict(QUIET), [dict(QUIET)] * services, []


async def measure(
    run: Run,
    *,
    rounds: int,
    free_port: Callable[[], int],
    tracing: Sequence[str],
    services: int,
    progress: Callable[[str], None],
    spans: Path | None = None,
) -> dict[str, Any]:
    """The variants in ``rounds`` alternating rounds (:mod:`bench.variants`), compared
    with metrics off against :data:`BUDGETS`; tracing is left out when the SDK is
    missing, and not compared when a round's processes exported no span."""
    names = ["off", "metrics"]
    skipped: str | None = None
    if tracing_available():
        names.append("tracing")
    else:
        skipped = TRACING_MISSING
        progress(TRACING_MISSING)

    async def one(name: str, n: int) -> dict[str, Any]:
        coordinator, participants, ports = settings(
            name, free_port=free_port, tracing=tracing, services=services, spans=spans
        )
        return await run(name, n, coordinator, participants, ports)

    runs = await variants.run_rounds(
        names, one, rounds=rounds, phase="observability", progress=progress, labels=LABELS
    )
    left_out: list[str] = []
    if "tracing" in runs and not all(r.get("spans") for r in runs["tracing"]):
        # Nothing traced in some round: its ratio would be metrics off's against itself.
        skipped = TRACING_SILENT
        left_out.append("tracing")
        progress(TRACING_SILENT)
    found = variants.compare(runs, baseline="off", budgets=BUDGETS, left_out=left_out)
    return {**found, "skipped": skipped}


def render(o: Mapping[str, Any]) -> list[str]:
    """The report's lines for the phase: :func:`bench.variants.render` with the scrapes
    and the spans of every round."""
    notes: dict[str, list[str]] = {}
    scraped = [r["scraper"] for r in o["runs"].get("metrics", []) if r.get("scraper")]
    if scraped:
        p99 = max((s["scrape_ms"]["p99"] or 0.0) for s in scraped)
        notes["metrics"] = [
            f"{sum(s['scrapes'] for s in scraped)} scrapes of {scraped[0]['targets']} targets"
            f" every {scraped[0]['interval_s']:g} s over {len(scraped)} run(s), worst p99"
            f" {p99} ms, {sum(s['failures'] for s in scraped)} failed"
        ]
    if "tracing" in o["runs"]:
        spans = " ".join(str(r.get("spans", 0)) for r in o["runs"]["tracing"])
        notes["tracing"] = [f"spans exported by round: {spans}"]
    lines = variants.render(
        o,
        title="Observability's cost (closed loop, the same sagas and concurrency each;"
        " CPU = coordinator + participants)",
        notes=notes,
    )
    if o.get("skipped"):
        lines.append(f"  {o['skipped']}")
    return lines
