"""The standard workload and its two drivers: a closed loop (throughput) and an open loop
(latency at a fixed arrival rate).

Sagas are started through the coordinator's gRPC API (:class:`sagaplane.SagaClient`,
one per coordinator, each request built once). Their end ("terminal") is read from
the coordinator's database, not by polling GetSaga: one indexed query every
``poll_interval`` for all the sagas in flight (``completed_at IS NOT NULL``, or the
``compensation_failed`` state, which has no ``completed_at``). Saga latencies are computed
from timestamps, not from when the poll noticed:

- ``start->terminal`` = ``completed_at`` (database clock) - the moment the request was
  due (closed loop: when it was sent; open loop: its SCHEDULED time, so a harness that
  falls behind cannot hide latency: no coordinated omission). The database and the
  harness run on one machine and read the same clock.
- ``db`` = ``completed_at - created_at``: inside the coordinator only.

``completed_at`` is ``now()`` of the transaction that made the saga terminal, i.e. its
START; that transaction's commit (an fsync, ~1-3 ms here) is not included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import psycopg

from bench.infra import WATCHER_APPLICATION
from bench.stats import summary_ms
from sagaplane import SagaClient
from sagaplane.client import parse_start_request
from sagaplane.errors import CoordinatorError

if TYPE_CHECKING:
    from sagaplane.v1.coordinator_pb2 import StartSagaRequest

SAGA_NAME = "bench.order"
CONTEXT_BYTES = 1024


def make_context(size: int = CONTEXT_BYTES) -> dict[str, Any]:
    """A saga context whose JSON text is ``size`` bytes: a few fields and some padding."""
    ctx: dict[str, Any] = {
        "customer_id": "cus_0123456789abcdef",
        "currency": "EUR",
        "items": [{"sku": "bench-sku-1", "qty": 1, "price": 42}],
        "shipping": {"country": "NL", "city": "Utrecht", "postcode": "3511"},
        "note": "",
    }
    ctx["note"] = "x" * max(0, size - len(json.dumps(ctx)))
    return ctx


SHAPES = ("standard", "fanout", "line4")
"""The sagas the load can start: the standard 3 steps in a line; one step, then 3
independent ones (4 steps, 2 deep); the same 4 steps in a line (4 deep). Besides these,
``line<N>`` (``line20``, ``line100``: ``--phases steps``) is N steps in a line, going
round the three services' actions (:func:`line_steps`)."""

_ROUND = (
    ("orders.create", "orders.cancel", {"sku": "bench-sku-1", "qty": 1}),
    ("inventory.reserve", "inventory.release", {"sku": "bench-sku-1", "qty": 1}),
    ("payment.charge", "payment.refund", {"amount": 42}),
)


def line_steps(n: int, *, fail: bool = False) -> list[dict[str, Any]]:
    """N steps in a line, orders, inventory, payment, orders, ...; the last one fails
    when ``fail``."""
    steps = []
    for i in range(n):
        action, undo, given = _ROUND[i % len(_ROUND)]
        steps.append(step(f"s{i + 1}", action, undo, {**given, "fail": fail and i == n - 1}))
    return steps


def steps_in(shape: str) -> int:
    """How many steps a saga of ``shape`` has."""
    if shape == "standard":
        return 3
    if shape in SHAPES:
        return 4
    return int(shape.removeprefix("line"))


def start_request(
    *, fail: bool = False, shape: str = "standard", context_bytes: int = CONTEXT_BYTES
) -> StartSagaRequest:
    """The StartSaga request of the workload (:data:`SHAPES`, or ``line<N>``), with a
    context of ``context_bytes``; every step has a compensation, and the charge (the
    last step of a ``line<N>``) fails when ``fail``.

    Parsed once from its JSON form, then sent as is with
    :meth:`~sagaplane.SagaClient.start_saga_request`: building it for every saga would
    add the harness's CPU to what is measured."""
    if shape not in SHAPES:
        return parse_start_request(
            {
                "name": SAGA_NAME,
                "steps": line_steps(steps_in(shape), fail=fail),
                "context": make_context(context_bytes),
            }
        )
    steps: list[dict[str, Any]] = [
        step("create", "orders.create", "orders.cancel", {"sku": "bench-sku-1", "qty": 1}),
        step("reserve", "inventory.reserve", "inventory.release", {"sku": "bench-sku-1", "qty": 1}),
        step("charge", "payment.charge", "payment.refund", {"amount": 42, "fail": fail}),
    ]
    if shape != "standard":
        steps.append(step("note", "orders.create", "orders.cancel", {"sku": "bench-sku-1"}))
    if shape == "fanout":
        for s in steps[1:]:
            s["depends_on"] = ["create"]
    return parse_start_request(
        {"name": SAGA_NAME, "steps": steps, "context": make_context(context_bytes)}
    )


def step(name: str, action: str, undo: str, given: dict[str, Any]) -> dict[str, Any]:
    """One step of the request, in its JSON form."""
    return {"name": name, "action": action, "compensation": undo, "input": given}


@dataclass(frozen=True)
class Terminal:
    """How a saga ended, as the coordinator's database recorded it (epoch seconds)."""

    state: str
    created_at: float
    terminal_at: float
    observed_at: float


_TERMINAL_QUERY = """
SELECT id, state, created_at, coalesce(completed_at, updated_at)
FROM sagaplane_sagas
WHERE id = ANY(%s) AND (completed_at IS NOT NULL OR state = 'compensation_failed')
"""

# The history is append-only with an identity key: reading the rows added since the last
# look costs what was added, not what is in flight.
_HISTORY_TAIL = """
SELECT id, saga_id, to_state FROM sagaplane_history WHERE id >= %s ORDER BY id LIMIT 10000
"""
_TERMINAL_STATES = frozenset({"completed", "failed", "compensated", "compensation_failed"})
_GAP_PATIENCE = 2.0
"""Seconds an identity value may stay unseen before it counts as a gap (a rolled-back
insert) rather than a transaction that has not committed yet."""


class TerminalWatcher:
    """Resolves a future per saga once the coordinator's database shows it terminal.

    Every ``poll_interval`` it reads the history rows added since its last look (by their
    identity key; rows of transactions that commit out of order are waited for), and
    reads from ``sagaplane_sagas`` the sagas whose new history rows moved them to a
    terminal state. Once a second it also checks every saga waited for longer than that,
    in case a history row was missed.
    """

    def __init__(self, database_url: str, poll_interval: float) -> None:
        self._url = database_url
        self._interval = poll_interval
        self._pending: dict[str, asyncio.Future[Terminal]] = {}
        self._since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._low = 0
        """Every history id below this one was seen (or given up on as a gap)."""
        self._seen: set[int] = set()
        self._gap_at: int | None = None
        self._gap_since = 0.0
        self._troubles: list[str] = []
        self.polls = 0

    async def __aenter__(self) -> TerminalWatcher:
        self._conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name=WATCHER_APPLICATION
        )
        # Until autovacuum has analyzed the fresh tables, the planner guesses a third of
        # the history matches "id >= x" and reads all of it at every poll: CPU that the
        # system under test then lacks. Every query here is an index lookup by design.
        await self._conn.execute("SET enable_seqscan = off")
        row = await (
            await self._conn.execute("SELECT coalesce(max(id), 0) + 1 FROM sagaplane_history")
        ).fetchone()
        self._low = int(row[0]) if row else 1
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()

    def watch(self, saga_id: str) -> asyncio.Future[Terminal]:
        fut: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()
        self._pending[saga_id] = fut
        self._since[saga_id] = time.monotonic()
        return fut

    async def _tail(self) -> set[str]:
        """Saga ids whose history rows added since the last look include a terminal state."""
        assert self._conn is not None
        cur = await self._conn.execute(_HISTORY_TAIL, (self._low,), prepare=True)
        rows = await cur.fetchall()
        ended = {saga_id for _, saga_id, state in rows if state in _TERMINAL_STATES}
        self._seen.update(int(r[0]) for r in rows)
        while self._low in self._seen:
            self._seen.discard(self._low)
            self._low += 1
        if self._seen:  # something above an unseen id: not committed yet, or a gap
            now = time.monotonic()
            if self._gap_at != self._low:
                self._gap_at, self._gap_since = self._low, now
            elif now - self._gap_since > _GAP_PATIENCE:
                # A gap for good (a rolled-back insert): skip to the lowest id seen.
                self._low = min(self._seen)
                while self._low in self._seen:
                    self._seen.discard(self._low)
                    self._low += 1
        else:
            self._gap_at = None
        # Rows above a gap are read again next time; resolve each saga once.
        return {saga_id for saga_id in ended if saga_id in self._pending}

    async def _resolve(self, ids: list[str]) -> None:
        assert self._conn is not None
        cur = await self._conn.execute(_TERMINAL_QUERY, (ids,), prepare=True)
        rows = await cur.fetchall()
        now = time.time()
        for saga_id, state, created, terminal in rows:
            fut = self._pending.pop(saga_id, None)
            self._since.pop(saga_id, None)
            if fut is not None and not fut.done():
                fut.set_result(
                    Terminal(
                        state=state,
                        created_at=created.timestamp(),
                        terminal_at=terminal.timestamp(),
                        observed_at=now,
                    )
                )

    def take_troubles(self) -> list[str]:
        """Connection troubles since the last call (the database went away under us)."""
        troubles, self._troubles = self._troubles, []
        return troubles

    async def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            try:
                self.polls += 1
                ended = await self._tail()
                if ended:
                    await self._resolve(sorted(ended))
                now = time.monotonic()
                if now - last_sweep > 1.0:
                    last_sweep = now
                    old = [i for i, t in self._since.items() if now - t > 1.0]
                    if old:
                        await self._resolve(old)
            except psycopg.Error as exc:
                # Someone restarted PostgreSQL or ended our connection: reconnect; the
                # once-a-second sweep catches up with whatever ended meanwhile.
                self._troubles.append(f"harness watcher: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self._conn_close()
                with contextlib.suppress(psycopg.Error):
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url, autocommit=True, application_name=WATCHER_APPLICATION
                    )
                continue
            await asyncio.sleep(self._interval)

    async def _conn_close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


@dataclass
class Sample:
    """One saga of a run."""

    due: float
    """When the request was due (epoch s): sent (closed loop) or scheduled (open loop)."""
    sent: float = 0.0
    rpc_done: float = 0.0
    saga_id: str = ""
    error: str | None = None
    terminal: Terminal | None = None


@dataclass
class Load:
    """One :class:`~sagaplane.SagaClient` (one channel) per coordinator, and the requests
    built once."""

    targets: Sequence[str]
    fail_rate: float = 0.0
    rpc_timeout: float = 30.0
    shape: str = "standard"
    """Which saga it starts (:data:`SHAPES`, or ``line<N>``)."""
    context_bytes: int = CONTEXT_BYTES
    on_started: Callable[[str], None] | None = None
    """Called with each saga's id as its StartSaga returns (the watchers phase)."""
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials for a coordinator that serves TLS (the security phase)."""
    token: str | None = None
    """The bearer token sent with every call (None: ``SagaClient``'s default)."""
    _clients: list[SagaClient] = field(default_factory=list)
    _ok: StartSagaRequest = field(init=False)
    _fail: StartSagaRequest = field(init=False)
    _rng: random.Random = field(default_factory=lambda: random.Random(6))
    _next: int = 0

    def __post_init__(self) -> None:
        self._ok = start_request(shape=self.shape, context_bytes=self.context_bytes)
        self._fail = start_request(fail=True, shape=self.shape, context_bytes=self.context_bytes)

    async def __aenter__(self) -> Load:
        self._clients = [
            SagaClient(t, timeout=self.rpc_timeout, credentials=self.credentials, token=self.token)
            for t in self.targets
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.close()

    async def start(self, sample: Sample) -> bool:
        """Send one StartSaga (round-robin over the coordinators); False on error."""
        client = self._clients[self._next % len(self._clients)]
        self._next += 1
        fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
        sample.sent = time.time()
        try:
            saga = await client.start_saga_request(self._fail if fail else self._ok)
        except CoordinatorError as exc:
            sample.rpc_done = time.time()
            sample.error = exc.message  # "<status code>: <details>"
            return False
        sample.rpc_done = time.time()
        sample.saga_id = saga.id
        if self.on_started is not None:
            self.on_started(saga.id)
        return True


async def closed_loop(
    load: Load,
    watcher: TerminalWatcher,
    *,
    sagas: int,
    concurrency: int,
    terminal_timeout: float = 120.0,
    samples: list[Sample] | None = None,
    on_end: Callable[[], None] | None = None,
) -> list[Sample]:
    """Start ``sagas`` sagas keeping ``concurrency`` in flight; each worker starts its
    next saga as soon as the previous one is terminal. ``samples`` (if given) is filled
    as the run goes; ``on_end`` is called whenever a saga ends."""
    samples = [] if samples is None else samples
    remaining = iter(range(sagas))

    async def worker() -> None:
        for _ in remaining:
            sample = Sample(due=time.time())
            samples.append(sample)
            if not await load.start(sample):
                continue
            try:
                async with asyncio.timeout(terminal_timeout):
                    sample.terminal = await watcher.watch(sample.saga_id)
            except TimeoutError:
                sample.error = "not terminal in time"
            if on_end is not None:
                on_end()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, sagas))))
    return samples


_DB_STATS = """
SELECT datname, xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,
       tup_fetched
FROM pg_stat_database WHERE datname = ANY(%s)
"""
_STAT_NAMES = ("commits", "rollbacks", "inserted", "updated", "deleted", "fetched")


async def database_activity(admin_url: str, databases: list[str]) -> dict[str, dict[str, int]]:
    """Cumulative transactions and row counts per database (``pg_stat_database``; a
    backend publishes its counts at most once a second while busy)."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as c:
        rows = await (await c.execute(_DB_STATS, (databases,))).fetchall()
    return {r[0]: dict(zip(_STAT_NAMES, map(int, r[1:]), strict=True)) for r in rows}


class SteadyWindow:
    """Observes a closed loop: between ``lo`` and ``hi`` of its sagas ended, the throughput
    and each database's transactions and rows per saga (ramp-up and tail left out).

    Call :meth:`ended` whenever a saga ends; then await :meth:`result`."""

    def __init__(
        self,
        total: int,
        admin_url: str,
        databases: list[str],
        *,
        lo: float = 0.2,
        hi: float = 0.8,
    ) -> None:
        self._marks = {max(1, math.ceil(lo * total)), max(1, math.ceil(hi * total))}
        self._admin_url = admin_url
        self._databases = databases
        self._ended = 0
        self._snapshots: list[asyncio.Task[tuple[float, int, dict[str, dict[str, int]]]]] = []

    def ended(self) -> None:
        self._ended += 1
        if self._ended in self._marks:
            self._snapshots.append(asyncio.create_task(self._snapshot(self._ended)))

    async def _snapshot(self, n: int) -> tuple[float, int, dict[str, dict[str, int]]]:
        t = time.monotonic()
        return t, n, await database_activity(self._admin_url, self._databases)

    async def result(self) -> dict[str, Any]:
        if len(self._snapshots) < 2:
            return {"error": "the run was too short for a steady window"}
        (t0, n0, a), (t1, n1, b) = await asyncio.gather(*self._snapshots[:2])
        sagas = max(1, n1 - n0)
        per_saga = {
            db: {k: round((b[db][k] - a[db].get(k, 0)) / sagas, 2) for k in _STAT_NAMES}
            for db in b
            if db in a
        }
        return {
            "sagas": sagas,
            "seconds": round(t1 - t0, 3),
            "sagas_per_s": round(sagas / max(1e-9, t1 - t0), 1),
            "per_saga": per_saga,
        }


async def open_loop(
    load: Load,
    watcher: TerminalWatcher,
    *,
    rate: float,
    duration: float,
    drain_timeout: float = 60.0,
) -> list[Sample]:
    """Start sagas at ``rate`` per second for ``duration`` seconds, each at its scheduled
    time whatever happened to the earlier ones; then wait for them to end."""
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * duration))
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(sample: Sample) -> None:
        if await load.start(sample):
            sample.terminal = await watcher.watch(sample.saga_id)

    t0_loop = loop.time() + 0.05
    t0_wall = time.time() + (t0_loop - loop.time())
    for i in range(count):
        delay = t0_loop + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sample = Sample(due=t0_wall + i / rate)
        samples.append(sample)
        tasks.append(asyncio.create_task(one(sample)))
    _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for sample in samples:
        if sample.error is None and sample.terminal is None:
            sample.error = "not terminal in time"
    return samples


def analyse(samples: Sequence[Sample], *, steps_per_saga: int = 3) -> dict[str, Any]:
    """Throughput and latency figures of a run."""
    done = [s for s in samples if s.terminal is not None]
    errors = [s for s in samples if s.error is not None]
    completed = [s for s in done if s.terminal is not None and s.terminal.state == "completed"]
    first = min((s.due for s in samples), default=0.0)
    last = max((s.terminal.terminal_at for s in done if s.terminal), default=first)
    wall = max(last - first, 1e-9)
    e2e = [s.terminal.terminal_at - s.due for s in done if s.terminal]
    db = [s.terminal.terminal_at - s.terminal.created_at for s in done if s.terminal]
    observed = [s.terminal.observed_at - s.due for s in done if s.terminal]
    rpc = [s.rpc_done - s.due for s in samples if s.rpc_done]
    send_lag = [s.sent - s.due for s in samples if s.sent]
    states: dict[str, int] = {}
    for s in done:
        assert s.terminal is not None
        states[s.terminal.state] = states.get(s.terminal.state, 0) + 1
    return {
        "sagas": len(samples),
        "terminal": len(done),
        "completed": len(completed),
        "not_completed": len(samples) - len(completed),
        "states": states,
        "errors": len(errors),
        "error_examples": sorted({s.error for s in errors if s.error})[:3],
        "wall_s": round(wall, 3),
        "sagas_per_s": round(len(done) / wall, 1),
        "steps_per_s": round(len(completed) * steps_per_saga / wall, 1),
        "start_to_terminal_ms": summary_ms(e2e),
        "db_created_to_terminal_ms": summary_ms(db),
        "observed_by_poll_ms": summary_ms(observed),
        "start_saga_rpc_ms": summary_ms(rpc),
        "send_lag_ms": summary_ms(send_lag),
    }


async def database_counts(database_url: str, saga_ids: list[str]) -> dict[str, int]:
    """History rows, executed steps and outbox rows of these sagas, from the coordinator DB."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        cur = await c.execute(
            """
            SELECT (SELECT count(*) FROM sagaplane_history WHERE saga_id = ANY(%(ids)s)),
                   (SELECT count(*) FROM sagaplane_steps
                     WHERE saga_id = ANY(%(ids)s) AND executed_at IS NOT NULL),
                   (SELECT count(*) FROM sagaplane_outbox WHERE correlation_id = ANY(%(ids)s))
            """,
            {"ids": saga_ids},
        )
        row = await cur.fetchone()
    assert row is not None
    return {"history_rows": int(row[0]), "steps_executed": int(row[1]), "commands": int(row[2])}
