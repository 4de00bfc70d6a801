"""Retention: old rows deleted in bounded batches, by any number of processes at once.

The outbox keeps a row after it was sent only for people to look at, and the inbox
keeps a row only to recognise a copy of a command already handled: both would grow
forever. :func:`prune_outbox` deletes sent rows older than a window,
:func:`prune_inbox` inbox rows first received longer ago than one. Each call is ONE
short transaction of at most ``limit`` rows that skips rows another process has locked
(``FOR UPDATE SKIP LOCKED``): replicas share the work without doing any of it twice,
and nothing that writes new rows ever waits for a pruner.

:class:`PruneLoop` runs such batches in a background task: every ``interval`` seconds a
pass, each job repeated while its batches come back full. The participant runs one for
its inbox and outbox; the coordinator one for its sagas and its outbox
(``coordinator.retention``).

The inbox window is a trade-off (README, "Retention"): a copy of a command that arrives
after its row was pruned runs the handler again. Copies come from redeliveries, the
relay publishing a row again, and the coordinator's retries of a step whose reply it did
not get, so the window must exceed the longest retry span of any step sent to the
service; the default, :data:`DEFAULT_INBOX_RETENTION`, is far past the default policies'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sagaplane import backoff
from sagaplane.durations import parse_duration
from sagaplane.queries import q
from sagaplane.runtime import log_crash

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_INBOX_RETENTION",
    "DEFAULT_INTERVAL",
    "DEFAULT_OUTBOX_RETENTION",
    "Job",
    "PruneLoop",
    "expired_inbox",
    "expired_outbox",
    "parse_retention",
    "prune_inbox",
    "prune_outbox",
]

log = logging.getLogger(__name__)

DEFAULT_INBOX_RETENTION = timedelta(days=7)
"""How long an inbox row is kept. It must exceed the longest span over which a copy of
a command can still arrive. The default retry policies span minutes (an action's 3
attempts, a compensation's 10, each up to its 30 s timeout and a backoff of at most
60 s: under 20 minutes), the outbox relay parks a row it cannot publish after about 15
minutes; a week leaves room for outages and for steps with longer policies."""

DEFAULT_OUTBOX_RETENTION = timedelta(hours=24)
"""How long a sent outbox row is kept (for people reading the table); unsent and parked
rows are never pruned."""

DEFAULT_BATCH = 1000
"""Rows deleted per transaction: short enough never to hold locks for long."""

DEFAULT_INTERVAL = 60.0
"""Seconds between passes."""

OFF = frozenset({"off", "none", "never", "forever"})
"""What turns a retention off (keep everything) in a flag or environment variable."""

Pool = AsyncConnectionPool[AsyncConnection[Any]]

Job = Callable[[int], Awaitable[int]]
"""One batch of one kind of row: deletes at most the given number, returns how many."""


def parse_retention(value: str | float | timedelta | None) -> timedelta | None:
    """A retention window from a duration (``30d``, ``24h``, seconds, a timedelta), or
    None for ``off`` (also ``none``, ``never``, ``forever``, empty or None): keep all.

    ValueError for anything else, and for a window of zero, which would delete at once.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", *OFF}):
        return None
    window = parse_duration(value)
    if window <= timedelta(0):
        raise ValueError(f"a retention must be longer than zero, not {value!r} (or say 'off')")
    return window


async def prune_outbox(pool: Pool, *, keep: timedelta, limit: int = DEFAULT_BATCH) -> int:
    """Delete at most ``limit`` outbox rows sent more than ``keep`` ago; how many went."""
    return await _count(pool, "outbox_prune", {"keep": keep, "limit": limit})


async def prune_inbox(pool: Pool, *, keep: timedelta, limit: int = DEFAULT_BATCH) -> int:
    """Delete at most ``limit`` inbox rows first received more than ``keep`` ago."""
    return await _count(pool, "inbox_prune", {"keep": keep, "limit": limit})


async def expired_outbox(pool: Pool, *, keep: timedelta) -> int:
    """How many outbox rows :func:`prune_outbox` would delete, all batches together."""
    return await _count(pool, "outbox_expired", {"keep": keep})


async def expired_inbox(pool: Pool, *, keep: timedelta) -> int:
    """How many inbox rows :func:`prune_inbox` would delete, all batches together."""
    return await _count(pool, "inbox_expired", {"keep": keep})


async def _count(pool: Pool, query: str, params: Mapping[str, Any]) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(q(query), params)
        row = await cur.fetchone()
        if not conn.autocommit:
            await conn.commit()
    assert row is not None
    return int(row[0])


class PruneLoop:
    """Runs retention ``jobs`` (by name) in a background task, a pass every ``interval``
    seconds; a job's batches repeat while they come back full (``batch`` rows).

    Errors in ``recoverable`` (the database is unreachable) are logged and the pass is
    tried again after a backoff; anything else ends the task loudly (a bug).
    """

    def __init__(
        self,
        jobs: Mapping[str, Job],
        *,
        interval: float = DEFAULT_INTERVAL,
        batch: int = DEFAULT_BATCH,
        name: str = "sagaplane-retention",
        recoverable: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout),
        max_backoff: float = 30.0,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._jobs = dict(jobs)
        self._interval = interval
        self._batch = batch
        self._name = name
        self._recoverable = recoverable
        self._max_backoff = max_backoff
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The loop's task, once started."""
        return self._task

    async def run_pass(self) -> dict[str, int]:
        """Run every job until it has nothing left (or stop was asked); rows deleted, by job."""
        deleted: dict[str, int] = {}
        for name, job in self._jobs.items():
            deleted[name] = 0
            while not self._stopping.is_set():
                count = await job(self._batch)
                deleted[name] += count
                if count < self._batch:
                    break
        return deleted

    async def start(self) -> None:
        """Run the loop in a named background task (nothing to do without jobs)."""
        if self._jobs:
            self._task = asyncio.create_task(self._run(), name=self._name)
            self._task.add_done_callback(log_crash(log, "retention loop"))

    async def stop(self) -> None:
        """Let the batch in progress commit, then stop. Safe to call twice."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            delay = self._interval
            try:
                deleted = await self.run_pass()
                failures = 0
                if any(deleted.values()):
                    log.info(
                        "retention: deleted %s",
                        ", ".join(f"{n} {what}" for what, n in deleted.items() if n),
                    )
            except self._recoverable as exc:
                failures += 1
                delay = backoff.delay(failures, maximum=self._max_backoff)
                log.warning("retention: database unavailable (%s); retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
