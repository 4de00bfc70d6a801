"""The coordinator's Prometheus metrics (served by :class:`sagaplane.metrics.MetricsServer`).

Counters and histograms are derived from the transitions the store commits (the
engine stays pure: :meth:`CoordinatorMetrics.observe` reads each transition's event,
the saga before it and the history entries it wrote). Gauges about the sagas in the
database (active by state, the oldest one's age) and the outbox are read at scrape time
from partial indexes, so their cost grows with the sagas still active, never with
the sagas stored. Labels are saga names, actions, kinds, states, outcomes and gRPC
methods and codes: never ids.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.engine import (
    CommandKind,
    SagaState,
    StepReplied,
    StepStatus,
    TimerFired,
    Transition,
)
from coordinator.store.repository import ActiveSagas, Observed, SagaStore

RESTING_STATES = frozenset(
    {
        SagaState.COMPLETED,
        SagaState.FAILED,
        SagaState.COMPENSATED,
        SagaState.COMPENSATION_FAILED,
    }
)
"""States a saga comes to rest in, counted by ``sagaplane_sagas_ended_total``. A
completed saga can still be compensated, and a compensation_failed one resolved, so one
saga may be counted in two of them (completed, then compensated)."""

SAGA_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
"""Seconds; sagas last from milliseconds to hours (retries, people resolving them)."""

ATTEMPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds from a command's dispatch to its reply (or timeout)."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Replies per transaction of the reply consumer (bounded by ``--prefetch``)."""

TIMER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
"""Seconds of one round of the timer loop (the query for due timers, firing them, the
commit): a millisecond or so when nothing is due, more with a backlog."""

_RETRY_EVENTS = {"step_attempt_failed": "execute", "compensation_attempt_failed": "compensate"}


class CoordinatorMetrics:
    """Every metric of one coordinator process, in its own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.started = Counter(
            "sagaplane_sagas_started",
            "Sagas started, by saga name.",
            ["saga"],
            registry=registry,
        )
        self.ended = Counter(
            "sagaplane_sagas_ended",
            "Sagas that came to rest, by saga name and state (completed, failed, "
            "compensated, compensation_failed).",
            ["saga", "state"],
            registry=registry,
        )
        self.duration = Histogram(
            "sagaplane_saga_duration_seconds",
            "Time from a saga's start to its coming to rest, by saga name and state.",
            ["saga", "state"],
            buckets=SAGA_BUCKETS,
            registry=registry,
        )
        self.attempts = Histogram(
            "sagaplane_step_attempt_duration_seconds",
            "Time from a command's dispatch to its reply or timeout, by action, kind "
            "(execute, compensate) and outcome (succeeded, failed, timed_out).",
            ["action", "kind", "outcome"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "sagaplane_step_retries",
            "Attempts that failed or timed out and were scheduled again, by action and kind.",
            ["action", "kind"],
            registry=registry,
        )
        self.timeouts = Counter(
            "sagaplane_step_timeouts",
            "Attempts without a reply by their deadline, by action and kind.",
            ["action", "kind"],
            registry=registry,
        )
        self.replies = Counter(
            "sagaplane_replies_applied",
            "Participants' replies that changed a saga.",
            registry=registry,
        )
        self.stale = Counter(
            "sagaplane_replies_stale",
            "Replies ignored as late or duplicate (an attempt no longer in flight).",
            registry=registry,
        )
        self.batches = Histogram(
            "sagaplane_reply_batch_size",
            "Replies applied together in one transaction.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.timer_rounds = Histogram(
            "sagaplane_timer_round_seconds",
            "Time of one round of the timer loop: finding due timeouts, retries and "
            "deadlines, firing them and committing.",
            buckets=TIMER_BUCKETS,
            registry=registry,
        )
        self.grpc = Counter(
            "sagaplane_grpc_requests",
            "gRPC calls answered, by service, method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.active = ActiveSagasCollector()
        registry.register(self.active)

    def observe(self, observed: Sequence[Observed]) -> None:
        """Count what one committed transaction did (see :data:`SagaStore.observer`)."""
        replies = 0
        for o in observed:
            t, event = o.transition, o.event
            if isinstance(event, StepReplied):
                replies += 1
                if t.ignored is None:
                    self.replies.inc()
                elif not t.refused:  # a refused reply is dead-lettered, and counted there
                    self.stale.inc()
            if t.ignored is not None:
                continue
            now = t.saga.updated_at
            if o.before is not None and isinstance(event, StepReplied | TimerFired):
                self._attempt_ended(o, now)
            self._history(t, now)
        if replies:
            self.batches.observe(replies)

    def _attempt_ended(self, o: Observed, now: datetime) -> None:
        assert o.before is not None
        step_id = o.event.step_id  # type: ignore[union-attr]
        before, after = o.before.step_by_id(step_id), o.transition.saga.step_by_id(step_id)
        if before is None or after is None or before.deadline_at is None:
            return
        if before.status is StepStatus.STARTED:
            kind, action, done = CommandKind.EXECUTE, before.action, StepStatus.COMPLETED
        elif before.status is StepStatus.COMPENSATING and before.compensation is not None:
            kind, action, done = CommandKind.COMPENSATE, before.compensation, StepStatus.COMPENSATED
        else:
            return  # a retry's timer: a dispatch, not the end of an attempt
        if isinstance(o.event, TimerFired):
            outcome = "timed_out"
            self.timeouts.labels(action, kind.value).inc()
        else:
            outcome = "succeeded" if after.status is done else "failed"
        dispatched = before.deadline_at - before.timeout
        seconds = max((now - dispatched).total_seconds(), 0.0)
        self.attempts.labels(action, kind.value, outcome).observe(seconds)

    def _history(self, t: Transition, now: datetime) -> None:
        saga = t.saga
        for entry in t.history:
            if entry.event == "saga_started":
                self.started.labels(saga.name).inc()
            elif entry.event in _RETRY_EVENTS:
                kind = _RETRY_EVENTS[entry.event]
                step = next(s for s in saga.steps if s.name == entry.step_name)
                action = step.action if kind == "execute" else step.compensation
                self.retries.labels(action or "", kind).inc()
            if entry.to_state in RESTING_STATES and entry.from_state is not entry.to_state:
                state = entry.to_state.value
                self.ended.labels(saga.name, state).inc()
                seconds = max((now - saga.created_at).total_seconds(), 0.0)
                self.duration.labels(saga.name, state).observe(seconds)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The gRPC server interceptor counting calls by method and status code (put it
        first: it must see the status the other interceptors set)."""
        return _CountingInterceptor(self.grpc)

    def refresher(self, store: SagaStore) -> Callable[[], Coroutine[Any, Any, None]]:
        """What a scrape awaits first: the active sagas read from the database."""

        async def refresh() -> None:
            self.active.update(await store.active_sagas())

        return refresh


class ActiveSagasCollector(Collector):
    """``sagaplane_sagas_active{saga,state}`` and
    ``sagaplane_active_saga_oldest_age_seconds{saga,state}``, as last read."""

    def __init__(self) -> None:
        self._rows: list[ActiveSagas] | None = None
        # Series seen once stay, at 0: a gauge that vanishes reads as "no data", not as
        # "none active" (and an alert on it would never resolve).
        self._seen: set[tuple[str, str]] = set()

    def update(self, rows: list[ActiveSagas]) -> None:
        """Replace the figures (called before each scrape renders)."""
        self._rows = rows
        self._seen |= {(r.name, r.state) for r in rows}

    def collect(self) -> Iterable[Metric]:
        """The gauges (nothing before the first read)."""
        if self._rows is None:
            return
        count = GaugeMetricFamily(
            "sagaplane_sagas_active",
            "Sagas in an active state (started, compensating, compensation_failed), by "
            "saga name and state. The same on every coordinator sharing the database.",
            labels=["saga", "state"],
        )
        oldest = GaugeMetricFamily(
            "sagaplane_active_saga_oldest_age_seconds",
            "Age of the oldest saga in each active state, by saga name and state.",
            labels=["saga", "state"],
        )
        present = {(r.name, r.state): r for r in self._rows}
        for key in sorted(self._seen):
            row = present.get(key)
            count.add_metric(list(key), row.count if row else 0)
            if row is not None:
                oldest.add_metric(list(key), row.oldest_age)
        yield count
        yield oldest


class _CountingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: gRPC answers UNIMPLEMENTED; no series for it
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        counter = self._counter

        def count(context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> None:
            code = context.code()  # set by abort() or set_code(); None: OK, or UNKNOWN
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            counter.labels(service, method, name).inc()

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    response = await unary(request, context)  # type: ignore[arg-type]
                except BaseException:
                    count(context, failed=True)
                    raise
                count(context, failed=False)
                return response

            return grpc.unary_unary_rpc_method_handler(
                counted,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        stream = handler.unary_stream
        if stream is not None and inspect.isasyncgenfunction(stream):

            async def streamed(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for item in stream(request, context):  # type: ignore[arg-type]
                        yield item
                except BaseException:
                    count(context, failed=True)
                    raise
                count(context, failed=False)

            return grpc.unary_stream_rpc_method_handler(
                streamed,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
