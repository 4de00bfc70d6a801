"""Prometheus metrics: the ``/metrics`` endpoint and what the coordinator and participants
share (process collectors, the outbox's gauges, dead letters).

The endpoint is a small HTTP/1.0 server on the process's own event loop, rather than
prometheus-client's ``start_http_server`` (a thread): gauges read from PostgreSQL at
scrape time (the outbox's backlog, the coordinator's active sagas) need the process's
async pool, which only the loop may use. Rendering the text is a fraction of a
millisecond for the few hundred series there are; nothing blocks the loop. Each process
object (a Coordinator, a Participant) has its own registry, so that several of them in
one process (tests) do not share counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from sagaplane.queries import q
from sagaplane.wire import StepKind

__all__ = [
    "DeadLetterCollector",
    "MetricsServer",
    "OutboxGauges",
    "ParticipantMetrics",
    "new_registry",
    "parse_listen",
]

log = logging.getLogger(__name__)

_SCRAPE_TIMEOUT = 10.0
"""Seconds a scrape's database reads may take before the scrape fails with 503."""


def new_registry() -> CollectorRegistry:
    """A registry with the client's process, platform and GC collectors (process basics:
    CPU seconds, resident memory, open file descriptors, ...)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464``, port 0 for a free one) as (host, port); ValueError
    naming the problem otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {listen!r}: expected host:port, e.g. 0.0.0.0:9464")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


class MetricsServer:
    """Serves ``registry`` as ``GET /metrics`` (Prometheus' text format) on ``listen``.

    ``refresh`` is awaited before each scrape renders (gauges read from the database);
    concurrent scrapes share one refresh, so a scrape storm costs one query at a time.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        *,
        refresh: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._registry = registry
        self._host, self._port = parse_listen(listen)
        self._refresh = refresh
        self._refreshing: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port bound (useful with port 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and serve; OSError (address in use, ...) if the address cannot be bound."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        """Stop listening; scrapes in progress are cut. Safe to call twice."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_SCRAPE_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = head.partition(b" ")
                path = rest.partition(b" ")[0].partition(b"?")[0]
                if method != b"GET" or path not in (b"/metrics", b"/metrics/"):
                    await _respond(writer, 404, b"text/plain", b"only GET /metrics here\n")
                    return
                try:
                    await self._refreshed()
                except Exception as exc:
                    log.warning("metrics: reading gauges failed: %s", exc)
                    await _respond(writer, 503, b"text/plain", b"gauges unavailable\n")
                    return
                await _respond(
                    writer, 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self._registry)
                )
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that never sent a request (a port probe): just close
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refreshed(self) -> None:
        if self._refresh is None:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh(), name="sagaplane-metrics")
        # Shielded: a scraper hanging up must not cancel the refresh the others await.
        await asyncio.shield(self._refreshing)


async def _respond(writer: asyncio.StreamWriter, status: int, kind: bytes, body: bytes) -> None:
    reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}[status]
    writer.write(
        b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason, kind, len(body))
    )
    writer.write(body)
    await writer.drain()


class OutboxGauges(Collector):
    """``sagaplane_outbox_backlog`` and ``sagaplane_outbox_parked``: the rows of this
    process's database outbox not published yet, and those given up on (a person must
    look). Read by :meth:`refresh` from the partial indexes on unsent and on parked rows,
    so a scrape costs what the backlog holds, never the outbox's whole history."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._backlog: float | None = None
        self._parked: float | None = None
        self._oldest: float | None = None

    async def refresh(self) -> None:
        """Read the counts (one autocommit statement)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(q("metrics_outbox"))
            row = await cur.fetchone()
        assert row is not None
        self._backlog, self._parked, self._oldest = float(row[0]), float(row[1]), float(row[2])

    def collect(self) -> Iterable[Metric]:
        """The gauges as last read (nothing before the first refresh)."""
        if self._backlog is None:
            return
        yield GaugeMetricFamily(
            "sagaplane_outbox_backlog",
            "Outbox rows not published yet (neither sent nor parked).",
            value=self._backlog,
        )
        yield GaugeMetricFamily(
            "sagaplane_outbox_oldest_age_seconds",
            "Age of the oldest outbox row not published yet; 0 when there is none.",
            value=self._oldest or 0.0,
        )
        yield GaugeMetricFamily(
            "sagaplane_outbox_parked",
            "Outbox rows parked after too many failed publishes; a person must look.",
            value=self._parked or 0.0,
        )


class DeadLetterCollector(Collector):
    """``sagaplane_dead_lettered_total{cause}``: messages this process dead-lettered,
    read from :attr:`sagaplane.consuming.DeadLetters.counts` at scrape time (``counts``
    returns that mapping, or an empty one before the process started)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        """One sample per cause seen."""
        family = CounterMetricFamily(
            "sagaplane_dead_lettered",
            "Messages this process sent to the dead-letter queue, by cause.",
            labels=["cause"],
        )
        for cause, count in sorted(self._counts().items()):
            family.add_metric([cause], count)
        yield family


HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Seconds; handlers are mostly a few database statements."""


class ParticipantMetrics:
    """A participant's own metrics (see the README's Metrics section for each one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "sagaplane_commands",
            "Commands taken from the queue, by action, kind (execute, compensate) and "
            "outcome (succeeded, failed, replayed, refused, dead_lettered, requeued, error).",
            ["action", "kind", "outcome"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "sagaplane_handler_duration_seconds",
            "Time a handler ran, by action, kind and outcome (succeeded, failed).",
            ["action", "kind", "outcome"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )

    def handled(
        self, action: str, kind: StepKind | None, outcome: str, seconds: float | None = None
    ) -> None:
        """One command's processing ended with ``outcome``; ``seconds`` the handler ran
        (None when it did not run). ``action`` is "" for a message that names no action
        this participant registered (the label must not take any value a sender likes)."""
        kind_label = kind.value if kind is not None else ""
        self.commands.labels(action, kind_label, outcome).inc()
        if seconds is not None:
            self.handler_duration.labels(action, kind_label, outcome).observe(seconds)
