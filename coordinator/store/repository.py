"""Every database call of the coordinator: sagas, steps, history and the outbox.

Each transition is one transaction: lock the saga rows (in id order), apply the
engine, write sagas, changed steps, history rows and outbox rows, commit. The
database clock (``now()``) is the only clock.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from ulid import ULID

from coordinator import engine
from coordinator.engine import (
    Command,
    CommandKind,
    CompensateRequested,
    Event,
    HistoryEntry,
    RetryPolicy,
    Saga,
    SagaDeadlinePassed,
    SagaSpec,
    SagaState,
    Step,
    StepReplied,
    StepStatus,
    TimerFired,
    WrongState,
)
from coordinator.errors import KeyReused, StorageUnavailable, UnknownSaga, Violation
from coordinator.store.notifications import Listener
from coordinator.store.queries import q
from sagaplane import batch, delivery, tracing, wire
from sagaplane.outbox import (
    INSERT_MANY,
    INSERT_ONE,
    OutboundMessage,
    insert_many_params,
    insert_params,
)

CommandEncoder = Callable[[Command], OutboundMessage]
"""Turns an engine command into the outbox row that carries it (see messaging.codec)."""


def new_id() -> str:
    """A fresh ULID, as the 26-character string used for saga and step ids."""
    return str(ULID())


_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def is_id(value: str) -> bool:
    """Whether ``value`` has the form of the ids :func:`new_id` makes (a ULID)."""
    return _ID.fullmatch(value) is not None


def new_token() -> str:
    """A fresh unguessable command token."""
    return secrets.token_urlsafe(16)


def _request_hash(request: bytes) -> bytes:
    """The fingerprint stored with an idempotency key: SHA-256 of the request's bytes.

    A start that reuses the key is a replay when its fingerprint is the same, and a
    conflict otherwise. Sagas stored earlier keep their fingerprints, so this must stay
    the function of the same bytes (the API's deterministic serialization of StartSaga).
    """
    return hashlib.sha256(request).digest()


@dataclass(frozen=True, kw_only=True)
class Started:
    """The outcome of :meth:`SagaStore.start`."""

    saga: Saga
    created: bool
    """False when an idempotent replay returned the saga started earlier."""


@dataclass(frozen=True, kw_only=True)
class SagaFilter:
    """What :meth:`SagaStore.list_sagas` keeps; None (or empty) keeps everything."""

    states: tuple[SagaState, ...] = ()
    """Sagas in one of these states; empty: every state."""
    name: str | None = None
    created_after: datetime | None = None
    """Created at or after."""
    created_before: datetime | None = None
    """Created strictly before."""
    id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class Applied:
    """The outcome of one event of :meth:`SagaStore.apply_many`."""

    saga_id: str
    transition: engine.Transition | None
    """None when the event failed; see ``error``."""
    error: UnknownSaga | WrongState | None = None
    """UnknownSaga or WrongState; the other events of the batch still apply."""


@dataclass(frozen=True, kw_only=True)
class Observed:
    """One committed transition, as an :data:`Observer` sees it."""

    before: Saga | None
    """The saga before the event; None for a saga just started."""
    event: Event | None
    """What happened; None for a start."""
    transition: engine.Transition
    """What the engine made of it (``ignored`` set when nothing changed)."""
    trace_context: Mapping[str, str] | None = None
    """The saga's stored W3C trace context (None: not traced); see sagaplane.tracing."""


Observer = Callable[[Sequence[Observed]], None]
"""Called with every transition of a transaction once it has committed (the metrics)."""


@dataclass(frozen=True, kw_only=True)
class ActiveSagas:
    """How many sagas of one name are in one active state (see :meth:`SagaStore.active_sagas`)."""

    name: str
    state: str
    count: int
    oldest_age: float
    """Seconds since the oldest of them started."""


@dataclass(frozen=True, kw_only=True)
class Pruned:
    """What one batch of :meth:`SagaStore.prune_sagas` deleted."""

    sagas: int
    steps: int
    history: int
    """History entries."""


@dataclass(frozen=True, kw_only=True)
class Expired:
    """The finished sagas of one name past their retention (see :meth:`SagaStore.expired`)."""

    name: str
    sagas: int
    steps: int
    history: int
    oldest: datetime
    """When the one that ended first ended."""


@asynccontextmanager
async def _storage_errors() -> AsyncIterator[None]:
    """Translate psycopg's connection troubles into StorageUnavailable, in one place."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise StorageUnavailable() from exc


class SagaStore:
    """Reads and writes sagas; every write is one transaction."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        encode: CommandEncoder,
        *,
        observer: Observer | None = None,
    ):
        self._pool = pool
        self._encode = encode
        self.observer = observer
        """Sees every committed transition (None: nobody looks, nothing is built)."""
        self.listener: Listener | None = None
        """This process's WatchSaga listener: handed every committed transition of a
        saga it has watchers for, so that they need not read it back."""

    async def start(
        self,
        spec: SagaSpec,
        *,
        request: bytes,
        trace: Mapping[str, str] | None = None,
        caller: str | None = None,
    ) -> Started:
        """Record a new saga and the command of its first step; its history entries name
        ``caller`` (who asked; None: nobody known).

        ``trace`` is the W3C trace context the saga belongs to (StartSaga's span), stored
        with it and continued by every command (None: not traced).

        ``request`` is the StartSaga request as bytes that are the same whenever the
        request is (protobuf's deterministic serialization): with an idempotency key
        already used, the saga started then is returned when they are the same, and
        KeyReused raised when they differ.
        """
        fingerprint = _request_hash(request)
        async with self._transaction() as cur:
            [[row]] = await batch.run(cur, [("BEGIN", None), (q("now"), None)])
            transition = _by(_begin(spec, row["now"]), caller)
            saga = transition.saga
            insert = (
                q("insert_saga"),
                _saga_row(saga) | {"request_hash": fingerprint, "trace_context": _trace(trace)},
            )
            traces = {saga.id: trace} if trace else {}
            if spec.idempotency_key is None:
                # A fresh id cannot conflict: the saga goes in the one batch with the rest.
                await self._write_and_commit(
                    cur, [transition], new=True, first=[insert], traces=traces
                )
            else:
                # The key may be taken (a replay): see before writing anything else.
                if not (await batch.run(cur, [insert]))[0]:
                    return await self._replay(cur, spec.idempotency_key, fingerprint)
                await self._write_and_commit(cur, [transition], new=True, traces=traces)
            if self.observer is not None:
                self.observer(
                    [Observed(before=None, event=None, transition=transition, trace_context=trace)]
                )
            return Started(saga=saga, created=True)

    async def start_many(
        self,
        specs: Sequence[SagaSpec],
        *,
        requests: Sequence[bytes],
        accept: Callable[[Sequence[Started]], None] | None = None,
        trace: Mapping[str, str] | None = None,
        caller: str | None = None,
    ) -> list[Started]:
        """Record many sagas and their first commands in ONE transaction: all or none.

        One outcome per spec, in order. ``requests`` are the specs' request bytes, as
        for :meth:`start`: a key already used with the same request gives the saga
        started then; a key used with a different one raises KeyReused, whose
        violations name each such spec by its index (``[17].idempotency_key``), and
        nothing is written. A key given twice here (with the same request, or KeyReused)
        is one saga, in both places. ``accept`` sees the outcomes before the commit and
        may raise to roll everything back. ``trace`` is stored with each saga, as for
        :meth:`start`. The history entries name ``caller``.

        Every row goes in a few multi-row statements, in at most three round trips.
        """
        fingerprints = [_request_hash(r) for r in requests]
        async with self._transaction() as cur:
            [[row]] = await batch.run(cur, [("BEGIN", None), (q("now"), None)])
            owner: list[int] = []  # the position whose saga each position gets
            first: dict[str, int] = {}  # idempotency key -> its first position
            new: dict[int, engine.Transition] = {}
            for i, spec in enumerate(specs):
                key = spec.idempotency_key
                if key is not None and key in first:
                    if fingerprints[first[key]] != fingerprints[i]:
                        raise KeyReused(violations=[_reused(i, key, "an earlier saga here")])
                    owner.append(first[key])
                    continue
                if key is not None:
                    first[key] = i
                owner.append(i)
                new[i] = _by(_begin(spec, row["now"]), caller)
            insert = (
                q("insert_sagas"),
                {
                    "rows": batch.records(
                        _saga_row(t.saga)
                        | {"request_hash": fingerprints[i], "trace_context": _trace(trace)}
                        for i, t in new.items()
                    )
                },
            )
            outcomes: dict[int, Started] = {}
            if first:
                # Some keys may be taken (replays): see before writing anything else.
                ids = [t.saga.id for t in new.values()]
                by_keys = {"keys": list(first), "ids": ids}
                inserted, saga_rows, step_rows = await batch.run(
                    cur,
                    [
                        insert,
                        (q("select_sagas_by_keys"), by_keys),
                        (q("select_steps_by_keys"), by_keys),
                    ],
                )
                created = {r["id"] for r in inserted}
                steps = _group_steps(step_rows)
                holders = {r["idempotency_key"]: r for r in saga_rows}
                conflicts: list[Violation] = []
                for key, i in first.items():
                    if new[i].saga.id in created:
                        continue
                    held = holders[key]  # the insert found it taken: it has committed
                    if bytes(held["request_hash"]) != fingerprints[i]:
                        conflicts.append(
                            _reused(i, key, f"a different request (saga {held['id']})")
                        )
                        continue
                    del new[i]
                    outcomes[i] = Started(
                        saga=_saga_from_row(held, steps.get(held["id"], ())), created=False
                    )
                if conflicts:
                    raise KeyReused(violations=conflicts)
                prefix: list[batch.Statement] = []
            else:
                prefix = [insert]
            outcomes |= {i: Started(saga=t.saga, created=True) for i, t in new.items()}
            results = [
                outcomes[j] if j == i else replace(outcomes[j], created=False)
                for i, j in enumerate(owner)
            ]
            if accept is not None:
                accept(results)
            await batch.run(
                cur, [*prefix, *self._insert_new(new.values(), trace), ("COMMIT", None)]
            )
            if self.observer is not None:
                self.observer(
                    [
                        Observed(before=None, event=None, transition=t, trace_context=trace)
                        for t in new.values()
                    ]
                )
            return results

    def _insert_new(
        self, transitions: Iterable[engine.Transition], trace: Mapping[str, str] | None
    ) -> list[batch.Statement]:
        """Multi-row inserts of the steps, history and commands of new sagas (whose saga
        rows are inserted already), all in the trace ``trace``."""
        steps: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        commands: list[OutboundMessage] = []
        for t in transitions:
            steps += (_step_row(t.saga.id, step) for step in t.saga.steps)
            history += (_history_row(t.saga.id, entry) for entry in t.history)
            commands += (self._outbound(command, trace) for command in t.commands)
        statements: list[batch.Statement] = []
        if steps:
            statements.append((q("insert_steps"), {"rows": batch.records(steps)}))
        if history:
            statements.append((q("insert_histories"), {"rows": batch.records(history)}))
        if commands:
            statements.append((INSERT_MANY, insert_many_params(commands)))
        return statements

    async def _replay(
        self, cur: AsyncClientCursor[DictRow], key: str, fingerprint: bytes
    ) -> Started:
        await cur.execute(q("find_by_idempotency_key"), {"key": key})
        found = await cur.fetchone()
        assert found is not None, "the conflicting insert has committed"
        if bytes(found["request_hash"]) != fingerprint:
            raise KeyReused(
                f"idempotency_key {key!r} was already used for a different "
                f"request (saga {found['id']})"
            )
        sagas = await self._load(cur, [found["id"]])
        return Started(saga=sagas[found["id"]], created=False)

    async def get(self, saga_id: str, *, history: bool = False) -> tuple[Saga, list[HistoryEntry]]:
        """The saga with this id, and its history when asked; raises UnknownSaga."""
        ids = {"ids": [saga_id]}
        async with self._reading() as cur:
            # One round trip: the saga, its steps, its history if asked, and what the
            # outbox says about its commands in flight.
            results = await batch.run(
                cur,
                [
                    (q("select_sagas"), ids),
                    (q("select_steps"), ids),
                    *([(q("select_history"), {"saga_id": saga_id})] if history else []),
                    (q("select_returned_commands"), ids),
                ],
            )
        saga_rows, step_rows, returned = results[0], results[1], results[-1]
        if not saga_rows:
            raise UnknownSaga(saga_id)
        saga = _saga_from_row(saga_rows[0], [_step_from_row(r) for r in step_rows])
        entries = [_history_from_row(row) for row in results[2]] if history else []
        return _with_delivery_problems(saga, returned), entries

    async def changes(self, saga_id: str, *, after: int) -> tuple[Saga, list[HistoryEntry]]:
        """The saga and its history entries with positions above ``after``, read in one
        snapshot (so the saga is exactly as those entries left it) and one round trip;
        raises UnknownSaga."""
        ids = {"ids": [saga_id]}
        async with self._transaction() as cur:
            saga_rows, step_rows, history_rows, returned = await batch.run(
                cur,
                [
                    ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", None),
                    (q("select_sagas"), ids),
                    (q("select_steps"), ids),
                    (q("select_history_after"), {"saga_id": saga_id, "after": after}),
                    (q("select_returned_commands"), ids),
                    ("COMMIT", None),
                ],
            )
        if not saga_rows:
            raise UnknownSaga(saga_id)
        saga = _saga_from_row(saga_rows[0], [_step_from_row(r) for r in step_rows])
        return _with_delivery_problems(saga, returned), [_history_from_row(r) for r in history_rows]

    async def list_sagas(
        self,
        *,
        limit: int,
        after: str | None,
        filters: SagaFilter,
        after_created: datetime | None = None,
    ) -> list[Saga]:
        """Sagas matching ``filters``, newest first (by created_at, then id), below the
        saga ``after`` created at ``after_created`` (keyset pagination; without it, the
        saga's created_at is looked up, and a deleted saga continues nowhere)."""
        params = {
            "limit": limit,
            "after": after,
            "after_created": after_created,
            "states": [s.value for s in filters.states or SagaState],
            "name": filters.name,
            "created_after": filters.created_after,
            "created_before": filters.created_before,
            "id": filters.id,
            "idempotency_key": filters.idempotency_key,
        }
        async with self._reading() as cur:
            await cur.execute(q("list_sagas"), params)
            rows = await cur.fetchall()
            steps = await self._steps(cur, [row["id"] for row in rows])
            return [_saga_from_row(row, steps.get(row["id"], ())) for row in rows]

    async def secret(self, name: str) -> bytes:
        """The shared secret called ``name`` (see ``sql/0003_keys.sql``); KeyError if none."""
        async with self._reading() as cur:
            await cur.execute(q("select_key"), {"name": name})
            row = await cur.fetchone()
        if row is None:
            raise KeyError(f"no secret {name!r} in sagaplane_keys")
        return bytes(row["secret"])

    async def list_active(
        self,
        *,
        limit: int,
        after: str | None,
        name: str | None,
        stale_for: timedelta = timedelta(0),
    ) -> list[Saga]:
        """Active sagas, newest first, with ids below ``after`` (keyset pagination),
        not updated for at least ``stale_for``."""
        params = {"limit": limit, "after": after or "~", "name": name, "stale_for": stale_for}
        async with self._reading() as cur:
            await cur.execute(q("list_active_by_name" if name else "list_active"), params)
            rows = await cur.fetchall()
            steps = await self._steps(cur, [row["id"] for row in rows])
            return [_saga_from_row(row, steps.get(row["id"], ())) for row in rows]

    async def active_sagas(self) -> list[ActiveSagas]:
        """Active sagas counted by name and state, with the oldest one's age: one
        statement on the partial index of active sagas, whose cost grows with the sagas
        still active, not with those stored."""
        async with self._reading() as cur:
            await cur.execute(q("metrics_active_sagas"))
            return [
                ActiveSagas(
                    name=row["name"],
                    state=row["state"],
                    count=row["count"],
                    oldest_age=float(row["oldest_age"]),
                )
                for row in await cur.fetchall()
            ]

    async def prune_sagas(
        self, *, keep: timedelta | None, keep_for: Mapping[str, timedelta | None], limit: int
    ) -> Pruned:
        """Delete at most ``limit`` finished sagas that ended longer ago than their name's
        window (``keep_for``, else ``keep``; None keeps them), with their steps and history.

        One short transaction of two round trips. Sagas locked elsewhere (another pruner,
        a transition in progress) are skipped, so concurrent pruners share the work and
        never wait for each other or for anyone. A deleted saga is gone for every API
        (NOT_FOUND) and its idempotency key is free again.
        """
        async with self._transaction() as cur:
            [claimed] = await batch.run(
                cur,
                [("BEGIN", None), (q("prune_claim_sagas"), rule_params(keep, keep_for, limit))],
            )
            if not claimed:
                await cur.execute("COMMIT")
                return Pruned(sagas=0, steps=0, history=0)
            ids = {"ids": [row["id"] for row in claimed]}
            [history], [steps], [sagas] = await batch.run(
                cur,
                [
                    (q("prune_delete_history"), ids),
                    (q("prune_delete_steps"), ids),
                    (q("prune_delete_sagas"), ids),
                    ("COMMIT", None),
                ],
            )
        return Pruned(sagas=sagas["count"], steps=steps["count"], history=history["count"])

    async def expired(
        self, *, keep: timedelta | None, keep_for: Mapping[str, timedelta | None]
    ) -> list[Expired]:
        """What :meth:`prune_sagas` would delete, all batches together, by saga name."""
        async with self._reading() as cur:
            await cur.execute(q("expired_sagas"), rule_params(keep, keep_for, 0))
            return [
                Expired(
                    name=row["name"],
                    sagas=row["sagas"],
                    steps=int(row["steps"]),
                    history=int(row["history"]),
                    oldest=row["oldest"],
                )
                for row in await cur.fetchall()
            ]

    async def apply(
        self, saga_id: str, event: Event, *, caller: str | None = None
    ) -> engine.Transition:
        """Apply one event in its own transaction; raises UnknownSaga or WrongState. The
        history entries it writes name ``caller`` (who asked; None: nobody known)."""
        async with self._transaction() as cur:
            (result,) = await self._apply_in(cur, [(saga_id, event)], begin=True, caller=caller)
        if result.error is not None:
            raise result.error
        assert result.transition is not None
        return result.transition

    async def apply_many(self, events: Sequence[tuple[str, Event]]) -> list[Applied]:
        """Apply many events in one transaction, in order; one result per event.

        Sagas are locked in id order, so concurrent batches cannot deadlock.
        """
        async with self._transaction() as cur:
            return await self._apply_in(cur, events, begin=True)

    async def fire_due_timers(self, limit: int) -> list[Applied]:
        """Apply every step timer and saga deadline that is due (up to ``limit`` each).

        One transaction; sagas locked by someone else are skipped (``SKIP LOCKED``), so
        replicas share the work and a busy saga is simply taken next round.
        """
        async with self._transaction() as cur:
            steps, sagas = await batch.run(
                cur,
                [
                    ("BEGIN", None),
                    (q("due_step_timers"), {"limit": limit}),
                    (q("due_saga_deadlines"), {"limit": limit}),
                ],
            )
            events: list[tuple[str, Event]] = [
                (row["saga_id"], TimerFired(step_id=row["step_id"])) for row in steps
            ]
            events += [(row["saga_id"], SagaDeadlinePassed()) for row in sagas]
            if not events:
                return []
            return await self._apply_in(cur, events, begin=False)

    async def _apply_in(
        self,
        cur: AsyncClientCursor[DictRow],
        events: Sequence[tuple[str, Event]],
        *,
        begin: bool,
        caller: str | None = None,
    ) -> list[Applied]:
        """Apply ``events`` and commit; with ``begin``, open the transaction too. Their
        history entries name ``caller``."""
        ids = sorted({saga_id for saga_id, _ in events})
        saga_rows, step_rows = await batch.run(
            cur,
            [
                *([("BEGIN", None)] if begin else []),
                (q("lock_sagas"), {"ids": ids}),
                (q("select_steps"), {"ids": ids}),
            ],
        )
        steps = _group_steps(step_rows)
        sagas = {row["id"]: _saga_from_row(row, steps.get(row["id"], ())) for row in saga_rows}
        traces = {row["id"]: row["trace_context"] for row in saga_rows if row["trace_context"]}
        original = dict(sagas)
        if saga_rows:
            events = await _with_proofs(cur, sagas, events, saga_rows[0]["db_now"])
        results: list[Applied] = []
        transitions: list[engine.Transition] = []
        observed: list[Observed] = []
        withdrawn: list[str] = []
        for saga_id, event in events:
            saga = sagas.get(saga_id)
            if saga is None:
                results.append(
                    Applied(saga_id=saga_id, transition=None, error=UnknownSaga(saga_id))
                )
                continue
            try:
                # lock_sagas reads now() with the rows: the transaction's one clock.
                t = engine.apply(saga, event, now=saga_rows[0]["db_now"], new_token=new_token)
                t = _by(t, caller)
            except WrongState as exc:
                results.append(Applied(saga_id=saga_id, transition=None, error=exc))
                continue
            if self.observer is not None:
                observed.append(
                    Observed(
                        before=saga, event=event, transition=t, trace_context=traces.get(saga_id)
                    )
                )
            if not isinstance(event, StepReplied):
                # A reply's command was delivered (its row is sent, or being marked so).
                withdrawn += _left_flight(saga, t.saga)
            sagas[saga_id] = t.saga
            transitions.append(t)
            results.append(Applied(saga_id=saga_id, transition=t))
        await self._write_and_commit(
            cur,
            transitions,
            original=original,
            traces=traces,
            last=[delivery.withdraw(withdrawn)] if withdrawn else [],
        )
        if self.observer is not None:
            self.observer(observed)
        return results

    async def _load(self, cur: AsyncClientCursor[DictRow], ids: list[str]) -> dict[str, Saga]:
        saga_rows, step_rows = await batch.run(
            cur, [(q("select_sagas"), {"ids": ids}), (q("select_steps"), {"ids": ids})]
        )
        steps = _group_steps(step_rows)
        return {row["id"]: _saga_from_row(row, steps.get(row["id"], ())) for row in saga_rows}

    async def _steps(
        self, cur: AsyncClientCursor[DictRow], ids: list[str]
    ) -> dict[str, tuple[Step, ...]]:
        if not ids:
            return {}
        await cur.execute(q("select_steps"), {"ids": ids})
        return _group_steps(await cur.fetchall())

    async def _write_and_commit(
        self,
        cur: AsyncClientCursor[DictRow],
        transitions: Sequence[engine.Transition],
        *,
        new: bool = False,
        first: Sequence[batch.Statement] = (),
        original: dict[str, Saga] | None = None,
        traces: Mapping[str, Mapping[str, str]] | None = None,
        last: Sequence[batch.Statement] = (),
    ) -> None:
        """Write sagas, changed steps, history and outbox rows, and COMMIT: one batch.

        ``new``: the saga rows are inserted (by ``first``, or already), so their steps
        are inserted too, not updated. ``first`` goes at the head of the batch, ``last``
        just before the COMMIT. ``traces``: the stored trace context of the sagas that
        have one, by id.
        """
        statements = list(first)
        changed = [t for t in transitions if t.ignored is None]
        latest = {t.saga.id: t.saga for t in changed}  # a saga may appear several times
        if not new:
            statements += [(q("update_saga"), _saga_row(s)) for s in latest.values()]
        for saga in latest.values():
            prior = (original or {}).get(saga.id)
            before = {s.position: s for s in prior.steps} if prior else {}
            for step in saga.steps:
                if new:
                    statements.append((q("insert_step"), _step_row(saga.id, step)))
                elif (previous := before.get(step.position)) != step:
                    row = _step_row(saga.id, step)
                    statements.append((q("update_step"), row))
                    if previous is not None and previous.input != step.input:
                        statements.append((q("update_step_input"), row))
        statements += [
            (q("insert_history"), _history_row(t.saga.id, entry))
            for t in changed
            for entry in t.history
        ]
        statements += [
            (INSERT_ONE, insert_params(self._outbound(command, (traces or {}).get(t.saga.id))))
            for t in changed
            for command in t.commands
        ]
        statements += last
        listener = self.listener
        if listener is None:
            statements.append(("COMMIT", None))
            await batch.run(cur, statements)
            return
        # Whose written entries this process keeps (their positions are read last before
        # the COMMIT, under the sagas' row locks): a new saga's, remembered for its first
        # watchers while WatchSaga is in use (store/recent.py); a changed saga's, handed
        # to its watchers (store/notifications.py).
        remembered = list(latest) if new and listener.recent.remembering() else []
        watched = [] if new else [s for s in latest if listener.watched(s)]
        if not new:
            listener.recent.forget(latest)
        kept = remembered or watched
        if kept:
            statements.append((q("select_written_history"), {"ids": kept}))
        statements.append(("COMMIT", None))
        if not kept:
            await batch.run(cur, statements)
            return
        since = listener.recent.since()
        with listener.expecting(watched):
            results = await batch.run(cur, statements)
            written: dict[str, list[DictRow]] = {}
            for row in results[-1]:
                written.setdefault(row["saga_id"], []).append(row)
            for saga_id, rows in written.items():
                entries = [_history_from_row(r) for r in rows]
                if remembered:
                    listener.recent.remember(latest[saga_id], entries, since)
                else:
                    listener.committed(saga_id, rows[0]["prior"], latest[saga_id], entries)

    def _outbound(self, command: Command, trace: Mapping[str, str] | None) -> OutboundMessage:
        """The outbox row of ``command``; in a traced saga, its AMQP headers carry the
        context of the command's attempt span (see sagaplane.tracing.child_carrier)."""
        message = self._encode(command)
        if trace:
            headers = tracing.child_carrier(trace, message.message_id)
            if headers is not None:
                # Beside the encoder's own (a signature).
                message = replace(message, headers={**(message.headers or {}), **headers})
        return message

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncClientCursor[DictRow]]:
        """A cursor for one write transaction, sent as batches (see sagaplane.batch).

        The caller's first batch starts with BEGIN and its last ends with COMMIT; a
        transaction still open at the end (nothing to write) is committed here, and one
        that raised is rolled back.
        """
        async with _storage_errors(), self._pool.connection() as conn:
            cur = AsyncClientCursor(conn, row_factory=dict_row)
            try:
                yield cur
            except BaseException:
                await batch.rollback_after_error(conn)
                raise
            if conn.info.transaction_status == TransactionStatus.INTRANS:
                await conn.commit()

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncClientCursor[DictRow]]:
        """A cursor for reads; autocommit, so no BEGIN or COMMIT round trips."""
        async with _storage_errors(), self._pool.connection() as conn:
            yield AsyncClientCursor(conn, row_factory=dict_row)


def _in_flight(step: Step) -> str | None:
    """The message id of the step's command in flight, if one is."""
    if step.status is StepStatus.STARTED:
        return wire.command_id(step.id, CommandKind.EXECUTE.value, step.attempts)
    if step.status is StepStatus.COMPENSATING:
        return wire.command_id(step.id, CommandKind.COMPENSATE.value, step.compensation_attempts)
    return None


def _left_flight(before: Saga, after: Saga) -> list[str]:
    """The message ids of commands that were in flight before and no longer are: the
    saga moved past them, so their outbox rows (if still unsent) are withdrawn."""
    now_in_flight = {_in_flight(s) for s in after.steps}
    return [m for s in before.steps if (m := _in_flight(s)) is not None and m not in now_in_flight]


async def _with_proofs(
    cur: AsyncClientCursor[DictRow],
    sagas: dict[str, Saga],
    events: Sequence[tuple[str, Event]],
    now: datetime,
) -> Sequence[tuple[str, Event]]:
    """``events``, each told which of its steps' commands in flight provably reached no
    queue (:mod:`sagaplane.delivery`): a timed-out attempt, or the steps a Compensate
    (or the saga's deadline) finds in flight. Their outbox rows are locked here until
    the commit (those a relay is publishing right now are skipped, and prove nothing);
    the transition withdraws them."""
    asked: dict[int, list[Step]] = {}
    for n, (saga_id, event) in enumerate(events):
        saga = sagas.get(saga_id)
        if saga is None:
            continue
        if isinstance(event, TimerFired):
            step = saga.step_by_id(event.step_id)
            if (
                step is not None
                and step.status is StepStatus.STARTED
                and step.deadline_at is not None
                and step.deadline_at <= now
            ):
                asked[n] = [step]
        elif isinstance(event, CompensateRequested | SagaDeadlinePassed):
            asked[n] = [s for s in saga.steps if s.status is StepStatus.STARTED]
    ids = sorted({m for steps in asked.values() for s in steps if (m := _in_flight(s))})
    if not ids:
        return events
    [locked] = await batch.run(cur, [delivery.lock(ids)])
    if not locked:
        return events
    [rows] = await batch.run(cur, [delivery.counts([row["id"] for row in locked])])
    proven = delivery.not_delivered(rows)

    def undelivered(steps: list[Step]) -> dict[str, str]:
        return {s.id: delivery.problem(s.action) for s in steps if _in_flight(s) in proven}

    told = list(events)
    for n, steps in asked.items():
        saga_id, event = events[n]
        found = undelivered(steps)
        if not found:
            continue
        if isinstance(event, TimerFired):
            told[n] = (saga_id, replace(event, undelivered=found[event.step_id]))
        elif isinstance(event, CompensateRequested | SagaDeadlinePassed):
            told[n] = (saga_id, replace(event, undelivered=found))
    return told


def _with_delivery_problems(saga: Saga, returned: Sequence[DictRow]) -> Saga:
    """``saga`` with the delivery problem of each command in flight that the broker
    returned as unroutable (what the relay recorded on its outbox row): ``returned`` are
    the saga's unsent outbox rows returned at least once (``select_returned_commands``),
    of which only those of a command still in flight count."""
    if not returned:
        return saga
    routing = {row["message_id"]: row["routing_key"] for row in returned}
    found = {s.position: routing[m] for s in saga.steps if (m := _in_flight(s)) in routing}
    if not found:
        return saga
    steps = tuple(
        replace(s, delivery_problem=delivery.problem(found[s.position]))
        if s.position in found
        else s
        for s in saga.steps
    )
    return replace(saga, steps=steps)


def _begin(spec: SagaSpec, now: datetime) -> engine.Transition:
    """The engine's start of a new saga, with fresh ids and tokens."""
    return engine.start(
        saga_id=new_id(),
        name=spec.name,
        steps=spec.steps,
        step_ids=[new_id() for _ in spec.steps],
        context=spec.context,
        idempotency_key=spec.idempotency_key,
        now=now,
        new_token=new_token,
        timeout=spec.timeout,
    )


def rule_params(
    keep: timedelta | None, keep_for: Mapping[str, timedelta | None], limit: int
) -> dict[str, Any]:
    """The parameters of the retention statements (``queries.sql``, "retention"):
    ``keep_for``'s windows, else ``keep``; at most ``limit`` sagas per batch."""
    return {
        "keep": keep,
        "names": list(keep_for),
        "keeps": list(keep_for.values()),
        "limit": limit,
    }


def _trace(trace: Mapping[str, str] | None) -> Jsonb | None:
    return Jsonb(dict(trace)) if trace else None


def _reused(position: int, key: str, what: str) -> Violation:
    return Violation(
        field=f"[{position}].idempotency_key",
        problem=f"{key!r} was already used for {what}",
    )


def _group_steps(rows: Sequence[DictRow]) -> dict[str, tuple[Step, ...]]:
    grouped: dict[str, list[Step]] = {}
    for row in rows:  # ordered by saga, then position
        grouped.setdefault(row["saga_id"], []).append(_step_from_row(row))
    return {k: tuple(v) for k, v in grouped.items()}


def _saga_row(saga: Saga) -> dict[str, Any]:
    return {
        "id": saga.id,
        "name": saga.name,
        "state": saga.state.value,
        "context": Jsonb(saga.context),
        "idempotency_key": saga.idempotency_key,
        "created_at": saga.created_at,
        "updated_at": saga.updated_at,
        "completed_at": saga.completed_at,
        "deadline_at": saga.deadline_at,
    }


# What a NULL policy column means: the defaults up to 0.1, when a policy equal to the
# default was stored as NULL. Rows are written with their policy now (and migration
# 0005 filled the NULLs in), but a replica of the previous version may still write NULL
# during a rolling upgrade. Never change these, whatever engine.DEFAULT_RETRY becomes.
_NULL_RETRY = RetryPolicy(
    max_attempts=3,
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    max_interval=timedelta(seconds=60),
)
_NULL_COMPENSATION_RETRY = replace(_NULL_RETRY, max_attempts=10)


def _policy_json(policy: RetryPolicy) -> Jsonb:
    # Always the policy itself: a saga keeps the one it was started with even after the
    # defaults change.
    return Jsonb(
        {
            "max_attempts": policy.max_attempts,
            "initial_interval_ms": policy.initial_interval // timedelta(milliseconds=1),
            "backoff_coefficient": policy.backoff_coefficient,
            "max_interval_ms": policy.max_interval // timedelta(milliseconds=1),
        }
    )


def _policy(data: dict[str, Any] | None, null: RetryPolicy) -> RetryPolicy:
    if data is None:
        return null
    return _cached_policy(
        data["max_attempts"],
        data["initial_interval_ms"],
        data["backoff_coefficient"],
        data["max_interval_ms"],
    )


@functools.lru_cache(maxsize=256)
def _cached_policy(
    max_attempts: int, initial_ms: int, coefficient: float, max_ms: int
) -> RetryPolicy:
    # Every step row carries its two policies and every transition reads them back; most
    # sagas share a handful of policies, and RetryPolicy is frozen, so they are shared.
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_interval=timedelta(milliseconds=initial_ms),
        backoff_coefficient=coefficient,
        max_interval=timedelta(milliseconds=max_ms),
    )


def _step_row(saga_id: str, step: Step) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "position": step.position,
        "id": step.id,
        "name": step.name,
        "action": step.action,
        "compensation": step.compensation,
        "input": Jsonb(step.input),
        "output": None if step.output is None else Jsonb(step.output),
        "status": step.status.value,
        "error": step.error,
        "attempts": step.attempts,
        "compensation_attempts": step.compensation_attempts,
        "token": step.token,
        "executed_at": step.executed_at,
        "compensated_at": step.compensated_at,
        "retry_policy": _policy_json(step.retry),
        "compensation_retry_policy": _policy_json(step.compensation_retry),
        "timeout_ms": step.timeout // timedelta(milliseconds=1),
        "deadline_at": step.deadline_at,
        "outcome_unknown": step.outcome_unknown,
        "depends_on": list(step.depends_on) if step.depends_on is not None else None,
        "condition": step.when,
    }


def _by(transition: engine.Transition, caller: str | None) -> engine.Transition:
    """``transition`` with ``caller`` recorded in each of its history entries."""
    if caller is None or not transition.history:
        return transition
    return replace(transition, history=tuple(replace(e, caller=caller) for e in transition.history))


def _history_row(saga_id: str, entry: HistoryEntry) -> dict[str, Any]:
    return {
        "saga_id": saga_id,
        "from_state": entry.from_state.value if entry.from_state else None,
        "to_state": entry.to_state.value,
        "step_name": entry.step_name,
        "event": entry.event,
        "reason": entry.reason,
        "caller": entry.caller,
    }


def _saga_from_row(row: DictRow, steps: Sequence[Step]) -> Saga:
    return Saga(
        id=row["id"],
        name=row["name"],
        state=SagaState(row["state"]),
        context=row["context"],
        steps=tuple(steps),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        idempotency_key=row["idempotency_key"],
        deadline_at=row["deadline_at"],
    )


def _step_from_row(row: DictRow) -> Step:
    return Step(
        id=row["id"],
        position=row["position"],
        name=row["name"],
        action=row["action"],
        compensation=row["compensation"],
        input=row["input"],
        output=row["output"],
        status=StepStatus(row["status"]),
        error=row["error"],
        attempts=row["attempts"],
        compensation_attempts=row["compensation_attempts"],
        token=row["token"],
        executed_at=row["executed_at"],
        compensated_at=row["compensated_at"],
        retry=_policy(row["retry_policy"], _NULL_RETRY),
        compensation_retry=_policy(row["compensation_retry_policy"], _NULL_COMPENSATION_RETRY),
        timeout=timedelta(milliseconds=row["timeout_ms"]),
        deadline_at=row["deadline_at"],
        outcome_unknown=row["outcome_unknown"],
        depends_on=tuple(row["depends_on"]) if row["depends_on"] is not None else None,
        when=row["condition"],
    )


def _history_from_row(row: DictRow) -> HistoryEntry:
    return HistoryEntry(
        from_state=SagaState(row["from_state"]) if row["from_state"] else None,
        to_state=SagaState(row["to_state"]),
        step_name=row["step_name"],
        event=row["event"],
        reason=row["reason"],
        at=row["at"],
        position=row["id"],
        caller=row["caller"],
    )
