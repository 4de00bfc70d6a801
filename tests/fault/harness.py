"""The fault suite's machinery: real processes, load, a chaos reply forwarder, draining, counting.

Every fault test builds a :class:`Rig` (a coordinator process, participant processes
from :mod:`fault.runner`, one database per service, a fresh vhost), starts sagas under
load while it injects its fault, then :meth:`Rig.drain` waits until every saga is
terminal and :meth:`Rig.tally` counts, from the coordinator's answers and from the
participants' own tables:

- started     sagas the client started (StartSaga answered with an id);
- terminal    of those, completed / failed / compensated;
- lost        started per the client, unknown to the coordinator (NOT_FOUND);
- stuck       not terminal after the drain's timeout (compensation_failed included);
- dup         duplicated effects: the same (saga, action) recorded more than once;
- disorder    compensations out of order: a compensation recorded before an effect of
              a later step (its compensation or its action), or before its own step's
              action;
- unexpected  terminal in another state than the saga's inputs call for.

All but the first two must be 0. The row also shows deliveries (every command a
participant received), redeliveries (copies of a message id received again) and
replies re-sent from the inbox, so that each row proves its fault did bite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import grpc
import psycopg
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from fault.schema import PAYMENT_LIMIT
from sagaplane import topology
from sagaplane.client import SagaClient, StepSpec
from sagaplane.errors import CoordinatorError, SagaNotFound
from sagaplane.sagas import RetryPolicy, Saga, SagaState
from sagaplane.testing import Child, free_port
from sagaplane.v1 import messages_pb2

log = logging.getLogger("fault")

_T = TypeVar("_T")

ROOT = Path(__file__).resolve().parents[2]
"""The repository."""

TERMINAL = frozenset({SagaState.COMPLETED, SagaState.FAILED, SagaState.COMPENSATED})
"""Finished for good. COMPENSATION_FAILED waits for a person: not terminal here."""

_RETRIED_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # A call cut off by a coordinator SIGKILL can end either way.
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)

_CHANNEL_OPTIONS = [
    # Reconnect quickly to a restarted coordinator instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def retry_policy(
    max_attempts: int, initial: float, coefficient: float = 1.5, maximum: float = 0.5
) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_interval=initial,
        backoff_coefficient=coefficient,
        max_interval=maximum,
    )


# -- processes --------------------------------------------------------------------------


def _child_env(env: dict[str, str]) -> dict[str, str]:
    # The runner is imported as fault.runner, from tests/.
    parts = [str(ROOT), str(ROOT / "tests")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), **env}


class CoordinatorChild(Child):
    """``python -m coordinator`` on a fixed port (so clients find it after a restart)."""

    def __init__(
        self,
        *,
        database_url: str,
        amqp_url: str,
        logs: Path,
        timer_interval: float,
        name: str = "coordinator",
    ) -> None:
        self.port = free_port()
        super().__init__(
            name,
            [sys.executable, "-m", "coordinator"],
            env=_child_env(
                {
                    "SAGAPLANE_DATABASE_URL": database_url,
                    "SAGAPLANE_AMQP_URL": amqp_url,
                    "SAGAPLANE_LISTEN": self.address,
                    "SAGAPLANE_GRACE": "1",
                    "SAGAPLANE_POOL_SIZE": "5",
                    "SAGAPLANE_TIMER_INTERVAL": str(timer_interval),
                }
            ),
            cwd=ROOT,
            log_path=logs / f"{name}.log",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, extra_env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        await super().start(extra_env)
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        def alive() -> None:
            if not self.alive:
                raise AssertionError(f"coordinator died while starting:\n{self.tail()}")

        async with SagaClient(self.address) as client:
            try:
                await client.wait_until_serving(timeout, alive=alive)
            except TimeoutError:
                raise AssertionError(
                    f"coordinator not healthy in {timeout}s:\n{self.tail()}"
                ) from None


class ParticipantChild(Child):
    """``python -m fault.runner`` hosting some of the services."""

    def __init__(
        self,
        name: str,
        *,
        amqp_url: str,
        databases: dict[str, str],
        logs: Path,
        reply_exchange: str | None = None,
    ) -> None:
        self.ready_file = logs / f"{name}.ready"
        argv = [sys.executable, "-m", "fault.runner", "--amqp-url", amqp_url]
        for service, url in databases.items():
            argv += ["--service", f"{service}={url}"]
        argv += ["--ready-file", str(self.ready_file)]
        if reply_exchange:
            argv += ["--reply-exchange", reply_exchange]
        super().__init__(name, argv, env=_child_env({}), cwd=ROOT, log_path=logs / f"{name}.log")

    async def start(  # type: ignore[override]  # it also says whether it got ready
        self, *, kill_after: int | None = None, timeout: float = 60.0
    ) -> bool:
        """Start and wait until it consumes; False if it died first (the kill hook)."""
        self.ready_file.unlink(missing_ok=True)
        await super().start({"FAULT_KILL_AFTER_COMMITS": str(kill_after)} if kill_after else None)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if not self.alive:
                return False
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)
        return True


# -- sagas ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepDef:
    name: str
    action: str
    compensation: str
    input: dict[str, Any]
    depends_on: tuple[str, ...] | None = None
    """None: the step before it."""


def order_steps(amount: float) -> list[StepDef]:
    """The demo order: create, reserve, charge (the charge fails above the limit)."""
    return [
        StepDef("create", "orders.create", "orders.delete", {"sku": "book", "qty": 1}),
        StepDef("reserve", "inventory.reserve", "inventory.release", {"sku": "book", "qty": 1}),
        StepDef("charge", "payment.charge", "payment.refund", {"amount": amount}),
    ]


def graph_order_steps(amount: float) -> list[StepDef]:
    """The order as a graph: create, then reserve, hold and charge side by side (fan-out
    3), then confirm once all three are done (join); the charge fails above the limit."""
    after_create = ("create",)
    return [
        StepDef("create", "orders.create", "orders.delete", {"sku": "book", "qty": 1}),
        StepDef("reserve", "inventory.reserve", "inventory.release", {"qty": 1}, after_create),
        StepDef("hold", "flaky.hold", "flaky.release", {}, after_create),
        StepDef("charge", "payment.charge", "payment.refund", {"amount": amount}, after_create),
        StepDef("confirm", "orders.confirm", "orders.unconfirm", {}, ("reserve", "hold", "charge")),
    ]


def descendants_of(steps: Sequence[StepDef]) -> dict[int, set[int]]:
    """For each position, the positions that depend on it, directly or not."""
    position = {s.name: i for i, s in enumerate(steps)}
    parents = [
        {position[n] for n in s.depends_on} if s.depends_on is not None else ({i - 1} - {-1})
        for i, s in enumerate(steps)
    ]
    below: dict[int, set[int]] = {i: set() for i in range(len(steps))}
    for i in reversed(range(len(steps))):
        for j in range(len(steps)):
            if i in parents[j]:
                below[i] |= {j} | below[j]
    return below


def order_amount(i: int) -> float:
    """Every fourth order is over the payment limit, so it compensates."""
    return 5000.0 if i % 4 == 0 else 10.0 + i


def expected_order_state(amount: float) -> SagaState:
    return SagaState.COMPENSATED if amount > PAYMENT_LIMIT else SagaState.COMPLETED


@dataclass(frozen=True)
class SagaRequest:
    """What :meth:`Rig.start_saga` starts: one saga, with an idempotency key."""

    key: str
    steps: Sequence[StepDef]
    name: str = "fault.order"
    step_timeout: float | None = None
    retry: RetryPolicy | None = None
    compensation_retry: RetryPolicy | None = None

    async def start(self, client: SagaClient) -> Saga:
        return await client.start_saga(
            self.name,
            [
                # The position goes with the input, so effects say which step they undo.
                StepSpec(
                    s.name,
                    s.action,
                    s.compensation,
                    s.input | {"position": i},
                    depends_on=s.depends_on,
                )
                for i, s in enumerate(self.steps)
            ],
            context={"key": self.key},
            idempotency_key=self.key,
            retry_policy=self.retry,
            compensation_retry_policy=self.compensation_retry,
            step_timeout=self.step_timeout,
        )


def saga_request(
    key: str,
    steps: Sequence[StepDef],
    *,
    name: str = "fault.order",
    step_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    compensation_retry: RetryPolicy | None = None,
) -> SagaRequest:
    return SagaRequest(key, steps, name, step_timeout, retry, compensation_retry)


@dataclass
class Started:
    key: str
    saga_id: str
    expected: SagaState
    descendants: dict[int, set[int]] | None = None
    """For a graph saga: who depends on each step (None: every later step)."""


@dataclass
class Totals:
    fault: str
    started: int
    terminal: int
    lost: int
    stuck: int
    duplicated: int
    out_of_order: int
    unexpected: int
    deliveries: int
    redeliveries: int
    resent: int
    seconds: float
    note: str = ""
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.stuck or self.duplicated or self.out_of_order or self.unexpected
        )


TOTALS: list[Totals] = []
"""One row per fault test run in this session (printed by ``fault/conftest.py``)."""

COLUMNS = (
    ("fault", "fault"),
    ("started", "started"),
    ("terminal", "terminal"),
    ("lost", "lost"),
    ("stuck", "stuck"),
    ("dup effects", "duplicated"),
    ("comp out of order", "out_of_order"),
    ("unexpected state", "unexpected"),
    ("deliveries", "deliveries"),
    ("redelivered", "redeliveries"),
    ("replies re-sent", "resent"),
    ("secs", "seconds"),
    ("what the fault did", "note"),
)


def totals_table(rows: Iterable[Totals]) -> list[str]:
    """A plain-text table of the rows (plus a total line)."""
    rows = list(rows)
    cells = [[h for h, _ in COLUMNS]]
    for r in rows:
        cells.append([_cell(getattr(r, a)) for _, a in COLUMNS])
    sums = [_cell(sum(getattr(r, a) for r in rows)) for _, a in COLUMNS[1:-1]]
    total = ["TOTAL", *sums, ""]
    cells.append(total)
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        first, last = row[0].ljust(widths[0]), row[-1].ljust(widths[-1])
        rest = [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
        return "| " + " | ".join([first, *rest, last]) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(cells[0]), sep, *(line(r) for r in cells[1:-1]), sep, line(cells[-1])]


def _cell(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


# -- the rig ----------------------------------------------------------------------------


class Rig:
    """Coordinator processes (one, or several replicas on the one database and vhost),
    participant processes, their databases; the client side."""

    def __init__(
        self,
        *,
        fault: str,
        database_url: str,
        amqp_url: str,
        service_urls: dict[str, str],
        logs: Path,
        timer_interval: float = 0.1,
    ) -> None:
        self.fault = fault
        self.database_url = database_url
        self.amqp_url = amqp_url
        self.service_urls = service_urls
        self.logs = logs
        self._timer_interval = timer_interval
        self.coordinator = CoordinatorChild(
            database_url=database_url, amqp_url=amqp_url, logs=logs, timer_interval=timer_interval
        )
        self.coordinators = [self.coordinator]
        """Every coordinator of the run (:meth:`start_replicas` adds to the first)."""
        self.participants: list[ParticipantChild] = []
        self.started: dict[str, Started] = {}
        self.retried_calls = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self.notes: list[str] = []
        """What the fault did, for the totals table."""
        self._client: SagaClient | None = None
        self.graph = False
        """Start orders as graphs (:func:`graph_order_steps`) rather than in a line."""
        self._t0 = time.monotonic()

    # processes

    async def start_coordinator(self) -> None:
        await self.coordinator.start()
        self._connect()

    async def start_replicas(
        self, count: int, env: Mapping[str, dict[str, str]] | None = None
    ) -> None:
        """``count`` coordinators on the one database and vhost (the first is
        :attr:`coordinator`), and a client given every address (one SagaClient, whose
        channel spreads the calls over the replicas that answer). ``env`` adds to a
        replica's environment, by its name (``coordinator``, ``coordinator-2``, ...)."""
        while len(self.coordinators) < count:
            self.coordinators.append(
                CoordinatorChild(
                    database_url=self.database_url,
                    amqp_url=self.amqp_url,
                    logs=self.logs,
                    timer_interval=self._timer_interval,
                    name=f"coordinator-{len(self.coordinators) + 1}",
                )
            )
        await asyncio.gather(*(c.start((env or {}).get(c.name)) for c in self.coordinators))
        self._connect()

    def _connect(self) -> None:
        if self._client is None:
            self._client = SagaClient(
                ",".join(c.address for c in self.coordinators),
                timeout=5.0,
                wait_for_ready=True,
                options=_CHANNEL_OPTIONS,
            )

    def participant(
        self, name: str, services: Sequence[str], *, reply_exchange: str | None = None
    ) -> ParticipantChild:
        child = ParticipantChild(
            name,
            amqp_url=self.amqp_url,
            databases={s: self.service_urls[s] for s in services},
            logs=self.logs,
            reply_exchange=reply_exchange,
        )
        self.participants.append(child)
        return child

    async def start_participants(
        self, services: Sequence[str] = ("orders", "inventory", "payment", "flaky"), **kw: Any
    ) -> ParticipantChild:
        child = self.participant("participants", services, **kw)
        assert await child.start(), child.tail()
        return child

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """A background task of the test (load, chaos), cancelled by :meth:`close` if a
        failure left it running."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for child in [*self.participants, *self.coordinators]:
            with contextlib.suppress(Exception):
                await child.stop()
        if self._client is not None:
            await self._client.close()

    def assert_alive(self, *, killed: Iterable[Child] = ()) -> None:
        """The processes the fault did not kill on purpose (``killed``: those it killed
        and left dead) must have survived it."""
        gone = list(killed)
        for child in [*self.coordinators, *self.participants]:
            if child not in gone:
                assert child.alive, f"{child.name} died (see {child.log_path}):\n{child.tail()}"

    # the client

    @property
    def client(self) -> SagaClient:
        assert self._client is not None, "start_coordinator() first"
        return self._client

    async def rpc(
        self, call: Callable[[SagaClient], Awaitable[_T]], *, deadline: float = 90.0
    ) -> _T:
        """``call(client)``, retried while the coordinator is away (killed, restarting, no
        database); each try has the client's 5 s deadline."""
        give_up = time.monotonic() + deadline
        delay = 0.05
        while True:
            try:
                return await call(self.client)
            except CoordinatorError as exc:
                if exc.code not in _RETRIED_CODES or time.monotonic() > give_up:
                    raise
                self.retried_calls += 1
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def start_saga(self, request: SagaRequest, expected: SagaState) -> Started:
        """StartSaga with an idempotency key, repeated until it answers (a crash may
        hide whether the first try committed; the key makes the repeat safe)."""
        key = request.key
        assert key and key not in self.started
        saga = await self.rpc(request.start)
        graph = any(s.depends_on is not None for s in request.steps)
        started = Started(
            key=key,
            saga_id=saga.id,
            expected=expected,
            descendants=descendants_of(request.steps) if graph else None,
        )
        self.started[key] = started
        return started

    async def start_order(self, i: int, **request_kw: Any) -> Started:
        amount = order_amount(i)
        key = f"{self.fault}-{i:04d}"
        steps = graph_order_steps(amount) if self.graph else order_steps(amount)
        return await self.start_saga(
            saga_request(key, steps, **request_kw), expected_order_state(amount)
        )

    async def load(
        self,
        *,
        minimum: int,
        maximum: int,
        until: asyncio.Event | None = None,
        workers: int = 4,
        pause: tuple[float, float] = (0.05, 0.3),
        first: int = 0,
        **request_kw: Any,
    ) -> int:
        """Start orders from ``workers`` tasks, pausing between starts, until ``until`` is
        set and at least ``minimum`` started (never more than ``maximum``); returns how many."""
        counter = iter(range(first, first + maximum))
        started = 0

        async def worker() -> None:
            nonlocal started
            for i in counter:
                await self.start_order(i, **request_kw)
                started += 1
                if started >= minimum and (until is None or until.is_set()):
                    return
                await asyncio.sleep(random.uniform(*pause))

        await asyncio.gather(*(worker() for _ in range(workers)))
        return started

    async def get(self, saga_id: str, *, history: bool = False) -> Saga:
        return await self.rpc(lambda c: c.get_saga(saga_id, include_history=history))

    async def active_ids(self, **filters: Any) -> set[str]:
        """Ids of every active saga (ListActive, all pages)."""
        found: set[str] = set()
        token = ""
        while True:
            page = await self.rpc(lambda c, after=token: c.list_active(1000, after, **filters))
            found |= {s.id for s in page.sagas}
            token = page.next_page_token
            if not token:
                return found

    async def wait_states(
        self,
        saga_ids: Iterable[str],
        states: Iterable[SagaState],
        timeout: float = 60.0,
    ) -> dict[str, Saga]:
        """Poll until every saga is in one of ``states``; fail with the laggards."""
        wanted = set(states)
        pending = set(saga_ids)
        done: dict[str, Saga] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for saga_id in list(pending):
                saga = await self.get(saga_id)
                if saga.state in wanted:
                    done[saga_id] = saga
                    pending.discard(saga_id)
            if pending and time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(pending)} sagas not in {sorted(wanted)} after {timeout}s: "
                    f"{sorted(pending)[:5]} (logs: {self.logs})"
                )
            await asyncio.sleep(0.1)
        return done

    async def drain(self, timeout: float = 90.0) -> float:
        """Wait until no saga of this run is active, or ``timeout``; the seconds waited."""
        t0 = time.monotonic()
        ids = {s.saga_id for s in self.started.values()}
        while time.monotonic() - t0 < timeout:
            if not ids & await self.active_ids():
                break
            await asyncio.sleep(0.25)
        return time.monotonic() - t0

    # counting

    async def effects(self, ids: Sequence[str]) -> list[tuple[str, str, str, int, Any]]:
        """Every effect of these sagas in every service: (saga, action, kind, position, at)."""
        found: list[tuple[str, str, str, int, Any]] = []
        for url in self.service_urls.values():
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT saga_id, action, kind, position, at FROM fault_effects"
                    " WHERE saga_id = ANY(%s)",
                    (list(ids),),
                )
                found += await cur.fetchall()
        return found

    async def deliveries(self, ids: Sequence[str]) -> tuple[int, int, int]:
        """(deliveries, redeliveries, replies re-sent from the inbox) of these sagas.

        Redeliveries: deliveries of a message id received before. Re-sent: commands
        answered with the inbox's stored outcome, without running the handler."""
        total = copies = resent = 0
        for url in self.service_urls.values():
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT count(*), count(*) - count(DISTINCT message_id) FROM fault_deliveries"
                    " WHERE saga_id = ANY(%s)",
                    (list(ids),),
                )
                row = await cur.fetchone()
                assert row is not None
                total += row[0]
                copies += row[1]
                cur = await conn.execute(
                    "SELECT count(*) FROM fault_replays WHERE saga_id = ANY(%s)", (list(ids),)
                )
                row = await cur.fetchone()
                resent += int(row[0]) if row else 0
        return total, copies, resent

    async def coordinator_saga_count(self) -> int:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM sagaplane_sagas")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def tally(self, *, drain_timeout: float = 90.0) -> Totals:
        """Drain, count, and record the row in :data:`TOTALS` (before any assertion)."""
        await self.drain(drain_timeout)
        details: list[str] = []
        states: dict[str, SagaState | None] = {}
        for s in self.started.values():
            try:
                states[s.saga_id] = (await self.get(s.saga_id)).state
            except SagaNotFound:
                states[s.saga_id] = None
        lost = [k for k, s in self.started.items() if states[s.saga_id] is None]
        stuck = [
            k
            for k, s in self.started.items()
            if states[s.saga_id] is not None and states[s.saga_id] not in TERMINAL
        ]
        unexpected = [
            k
            for k, s in self.started.items()
            if states[s.saga_id] in TERMINAL and states[s.saga_id] != s.expected
        ]
        for label, keys in (("lost", lost), ("stuck", stuck), ("unexpected", unexpected)):
            if keys:
                details.append(
                    f"{label}: "
                    + ", ".join(
                        f"{k}={self.started[k].saga_id}"
                        f"({_state_name(states[self.started[k].saga_id])})"
                        for k in keys[:10]
                    )
                )
        ids = [s.saga_id for s in self.started.values()]
        effects = await self.effects(ids)
        counts = Counter((saga, action) for saga, action, *_ in effects)
        duplicated = sum(n - 1 for n in counts.values() if n > 1)
        if duplicated:
            details.append(
                "duplicated: " + ", ".join(f"{k}x{n}" for k, n in counts.items() if n > 1)
            )
        shapes = {s.saga_id: s.descendants for s in self.started.values()}
        disorder = _compensations_out_of_order(effects, shapes)
        if disorder:
            details.append("out of order: " + "; ".join(disorder[:10]))
        phantoms = await self.coordinator_saga_count() - len(self.started)
        if phantoms:
            details.append(f"{phantoms} sagas in the coordinator that no client started")
        deliveries, copies, resent = await self.deliveries(ids)
        totals = Totals(
            fault=self.fault,
            started=len(self.started),
            terminal=sum(1 for s in states.values() if s in TERMINAL),
            lost=len(lost),
            stuck=len(stuck),
            duplicated=duplicated,
            out_of_order=len(disorder),
            unexpected=len(unexpected) + abs(phantoms),
            deliveries=deliveries,
            redeliveries=copies,
            resent=resent,
            seconds=time.monotonic() - self._t0,
            note="; ".join(self.notes),
            details=details,
        )
        TOTALS.append(totals)
        return totals

    def report(self, totals: Totals) -> str:
        """What an assertion shows when a count is not 0."""
        return "\n".join([*totals_table([totals]), *totals.details, f"logs: {self.logs}"])


def _state_name(state: SagaState | None) -> str:
    return "NOT_FOUND" if state is None else state.name


def _compensations_out_of_order(
    effects: Sequence[tuple[str, str, str, int, Any]],
    shapes: dict[str, dict[int, set[int]] | None],
) -> list[str]:
    """Compensations recorded before an effect of a step that depends on theirs, or
    before their own action.

    A step is undone only after every step that depends on it (for a saga in a line:
    every later step) has been undone, and each compensation is sent only after the
    replies it waits for: so a compensation's row must be later than every row of every
    step that depends on its step, and later than its own step's action.
    """
    by_saga: dict[str, list[tuple[str, str, int, Any]]] = defaultdict(list)
    for saga, action, kind, position, at in effects:
        by_saga[saga].append((action, kind, position, at))
    bad: list[str] = []
    for saga, rows in by_saga.items():
        below = shapes.get(saga)
        for action, kind, position, at in rows:
            if kind != "compensate":
                continue
            for other, other_kind, other_position, other_at in rows:
                dependent = (
                    other_position > position
                    if below is None
                    else other_position in below.get(position, set())
                )
                own_action = other_position == position and other_kind == "execute"
                if (dependent or own_action) and other_at > at:
                    bad.append(f"{saga}: {action} at {at} before {other} at {other_at}")
                    break
    return bad


# -- a chaos forwarder for replies ------------------------------------------------------

CHAOS_EXCHANGE = "fault.chaos.replies"
"""Where the participants of a reply-fault test publish their replies."""
CHAOS_QUEUE = "fault.chaos.replies"


@dataclass(frozen=True)
class HeldReply:
    """A reply as consumed from the chaos queue, to forward (or not) later."""

    body: bytes
    message_id: str | None
    message_type: str | None
    correlation_id: str | None
    step_id: str
    kind: int
    attempt: int
    succeeded: bool

    @property
    def key(self) -> tuple[str, int]:
        return (self.step_id, self.kind)


class ReplyForwarder:
    """Sits between the participants and the coordinator.

    Participants publish their replies to :data:`CHAOS_EXCHANGE`; this consumes them
    and calls ``policy(forwarder, reply)``, which decides what reaches the real
    ``sagaplane.replies`` exchange (via :meth:`forward`), when, and how often.
    """

    def __init__(
        self,
        amqp_url: str,
        policy: Callable[[ReplyForwarder, HeldReply], Awaitable[None]],
    ) -> None:
        self._amqp_url = amqp_url
        self._policy = policy
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._target: AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self.received = 0
        self.forwarded = 0

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self._amqp_url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        await self._channel.set_qos(prefetch_count=1000)
        await topology.declare_core(self._channel)
        chaos = await self._channel.declare_exchange(
            CHAOS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await self._channel.declare_queue(CHAOS_QUEUE, durable=True)
        await queue.bind(chaos, routing_key=topology.REPLIES_ROUTING_KEY)
        self._target = await self._channel.get_exchange(topology.REPLIES_EXCHANGE)
        await queue.consume(self._on_reply)

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def forward(self, reply: HeldReply) -> None:
        assert self._target is not None
        message = aio_pika.Message(
            reply.body,
            message_id=reply.message_id,
            type=reply.message_type,
            correlation_id=reply.correlation_id,
            content_type=topology.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        async with self._lock:  # keeps the order of forward() calls on the wire
            await self._target.publish(message, routing_key=topology.REPLIES_ROUTING_KEY)
        self.forwarded += 1

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = messages_pb2.StepReply()
        reply.ParseFromString(message.body)
        held = HeldReply(
            body=message.body,
            message_id=message.message_id,
            message_type=message.type,
            correlation_id=message.correlation_id,
            step_id=reply.step_id,
            kind=reply.kind,
            attempt=reply.attempt,
            succeeded=reply.outcome == messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        )
        self.received += 1
        await self._policy(self, held)
        await message.ack()
