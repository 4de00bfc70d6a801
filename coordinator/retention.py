"""Retention: finished sagas and sent outbox rows deleted once they are old enough.

A finished saga (completed, failed or compensated: ``sagaplane_saga_is_finished``,
``store/sql/0009_retention.sql``) is deleted with its steps and history once it ended
longer ago than its window: ``--retention`` for every name, ``--retention-for
NAME=DURATION`` for one (repeatable; ``NAME=off`` keeps that name's sagas). A saga in
``compensation_failed`` is never deleted: it waits for a person. A sent outbox row goes
after ``--outbox-retention`` (the SDK's :func:`sagaplane.retention.prune_outbox`).

Every replica runs the loop; each batch is one short transaction that skips what another
replica (or a transition) has locked, so replicas share the work, never delete a row
twice, and never make a StartSaga wait. ``sagaplane prune`` runs one pass, or with
``--dry-run`` says what a pass would delete.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from coordinator.errors import StorageUnavailable
from sagaplane import retention
from sagaplane.retention import DEFAULT_BATCH, DEFAULT_INTERVAL, DEFAULT_OUTBOX_RETENTION

if TYPE_CHECKING:  # config imports this module: keep the store out of the CLI's start
    from coordinator.store.repository import Expired, Pruned, SagaStore

TASK_NAME = "sagaplane-retention"

Pool = AsyncConnectionPool[AsyncConnection[Any]]


@dataclass(frozen=True, kw_only=True)
class Retention:
    """What is kept, and for how long. None keeps forever."""

    sagas: timedelta | None = None
    """How long a finished saga is kept after it ended (``--retention``); None: forever."""
    sagas_by_name: Mapping[str, timedelta | None] = field(default_factory=dict)
    """Windows of particular saga names (``--retention-for``), instead of ``sagas``."""
    outbox: timedelta | None = DEFAULT_OUTBOX_RETENTION
    """How long a sent outbox row is kept (``--outbox-retention``); None: forever."""
    batch: int = DEFAULT_BATCH
    """Rows (sagas, outbox rows) deleted per transaction (``--prune-batch``)."""
    interval: float = DEFAULT_INTERVAL
    """Seconds between passes (``--prune-interval``)."""

    @property
    def prunes_sagas(self) -> bool:
        """Whether any saga can ever be deleted."""
        return self.sagas is not None or any(w is not None for w in self.sagas_by_name.values())


@dataclass(kw_only=True)
class Totals:
    """What a pass deleted."""

    sagas: int = 0
    steps: int = 0
    history: int = 0
    outbox: int = 0

    def add(self, pruned: Pruned) -> None:
        """Count one batch of sagas."""
        self.sagas += pruned.sagas
        self.steps += pruned.steps
        self.history += pruned.history


class Pruner:
    """The coordinator's retention jobs, counting what they delete in :attr:`totals`."""

    def __init__(self, store: SagaStore, pool: Pool, rules: Retention) -> None:
        self._store = store
        self._pool = pool
        self.rules = rules
        self.totals = Totals()
        """Everything deleted since this pruner was made."""

    def jobs(self) -> dict[str, retention.Job]:
        """The jobs the rules call for (none when everything is kept)."""
        jobs: dict[str, retention.Job] = {}
        if self.rules.prunes_sagas:
            jobs["sagas"] = self._sagas
        if self.rules.outbox is not None:
            jobs["outbox rows"] = self._outbox
        return jobs

    def loop(self) -> retention.PruneLoop:
        """A background loop running :meth:`jobs` (see :class:`sagaplane.retention.PruneLoop`)."""
        return retention.PruneLoop(
            self.jobs(),
            interval=self.rules.interval,
            batch=self.rules.batch,
            name=TASK_NAME,
            recoverable=(StorageUnavailable, PoolTimeout),
        )

    async def run_pass(self) -> Totals:
        """One pass, until nothing is left to delete; what it deleted."""
        before = Totals(**vars(self.totals))
        await self.loop().run_pass()
        return Totals(**{k: v - getattr(before, k) for k, v in vars(self.totals).items()})

    async def dry_run(self) -> tuple[list[Expired], int]:
        """What a pass would delete: expired sagas by name, and the outbox rows."""
        sagas: list[Expired] = []
        if self.rules.prunes_sagas:
            sagas = await self._store.expired(
                keep=self.rules.sagas, keep_for=self.rules.sagas_by_name
            )
        outbox = 0
        if self.rules.outbox is not None:
            outbox = await _storage(retention.expired_outbox(self._pool, keep=self.rules.outbox))
        return sagas, outbox

    async def _sagas(self, limit: int) -> int:
        pruned = await self._store.prune_sagas(
            keep=self.rules.sagas, keep_for=self.rules.sagas_by_name, limit=limit
        )
        self.totals.add(pruned)
        return pruned.sagas

    async def _outbox(self, limit: int) -> int:
        assert self.rules.outbox is not None
        count = await _storage(
            retention.prune_outbox(self._pool, keep=self.rules.outbox, limit=limit)
        )
        self.totals.outbox += count
        return count


async def _storage(work: Awaitable[int]) -> int:
    try:
        return int(await work)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise StorageUnavailable() from exc


def parse_window(text: str) -> timedelta | None:
    """``30d``, ``12h``... or ``off`` (None); argparse's ArgumentTypeError otherwise."""
    try:
        return retention.parse_retention(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_rule(text: str) -> tuple[str, timedelta | None]:
    """``NAME=DURATION`` (``payments=365d``, ``reports=off``) for ``--retention-for``."""
    name, sep, window = text.rpartition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=DURATION (say payments=365d, or reports=off)"
        )
    return name.strip(), parse_window(window)


def parse_rules(text: str) -> dict[str, timedelta | None]:
    """A comma-separated list of ``NAME=DURATION`` (``SAGAPLANE_RETENTION_FOR``);
    ValueError naming the variable if it is not."""
    try:
        return dict(parse_rule(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"SAGAPLANE_RETENTION_FOR: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The retention flags (``serve`` and ``prune`` share them), defaults from ``env``."""
    d = Retention()
    group = parser.add_argument_group("retention")
    group.add_argument(
        "--retention",
        metavar="DURATION",
        type=parse_window,
        default=_env_window(env, "SAGAPLANE_RETENTION", None),
        help="delete finished sagas (completed, failed, compensated) this long after "
        "they ended, e.g. 30d; 'off' keeps them [SAGAPLANE_RETENTION; default off]",
    )
    group.add_argument(
        "--retention-for",
        metavar="NAME=DURATION",
        type=parse_rule,
        action="append",
        default=[],
        help="the retention of sagas of one name instead, e.g. payments=365d or "
        "reports=off; repeat for more [SAGAPLANE_RETENTION_FOR, comma-separated]",
    )
    group.add_argument(
        "--outbox-retention",
        metavar="DURATION",
        type=parse_window,
        default=_env_window(env, "SAGAPLANE_OUTBOX_RETENTION", d.outbox),
        help="delete sent outbox rows this long after they were sent, e.g. 48h; 'off' "
        "keeps them [SAGAPLANE_OUTBOX_RETENTION; default 24h]",
    )
    group.add_argument(
        "--prune-batch",
        metavar="ROWS",
        type=_batch,
        default=_batch(env.get("SAGAPLANE_PRUNE_BATCH", str(d.batch))),
        help="sagas or outbox rows deleted per transaction "
        "[SAGAPLANE_PRUNE_BATCH; default %(default)s]",
    )
    group.add_argument(
        "--prune-interval",
        metavar="SECONDS",
        type=float,
        default=float(env.get("SAGAPLANE_PRUNE_INTERVAL", d.interval)),
        help="seconds between retention passes [SAGAPLANE_PRUNE_INTERVAL; default %(default)s]",
    )
    parser.set_defaults(env_retention_for=parse_rules(env.get("SAGAPLANE_RETENTION_FOR", "")))


def from_args(args: argparse.Namespace) -> Retention:
    """The rules the flags of :func:`add_arguments` say (a flag's rule wins over the
    environment's for the same name)."""
    return Retention(
        sagas=args.retention,
        sagas_by_name={**args.env_retention_for, **dict(args.retention_for)},
        outbox=args.outbox_retention,
        batch=args.prune_batch,
        interval=args.prune_interval,
    )


def _batch(text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"a batch is a number of rows >= 1, not {text!r}")
    return rows


def _env_window(env: Mapping[str, str], name: str, default: timedelta | None) -> timedelta | None:
    if name not in env:
        return default
    try:
        return retention.parse_retention(env[name])
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def describe(rules: Retention) -> str:
    """The rules in a line, for logs and ``sagaplane prune``."""
    parts = [f"finished sagas: {_window(rules.sagas)}"]
    parts += [f"{name}: {_window(w)}" for name, w in sorted(rules.sagas_by_name.items())]
    parts.append(f"sent outbox rows: {_window(rules.outbox)}")
    return "; ".join(parts)


def _window(window: timedelta | None) -> str:
    if window is None:
        return "kept"
    if window % timedelta(days=1) == timedelta(0):
        return f"{window.days}d"
    if window % timedelta(hours=1) == timedelta(0):
        return f"{window // timedelta(hours=1)}h"
    return f"{window.total_seconds():g}s"
