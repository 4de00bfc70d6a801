"""The timer loop: step timeouts, due retries and saga deadlines.

Deadlines live in PostgreSQL and are compared with the database's clock, so they
survive a restart and no process clock matters. Every replica runs this loop;
``SKIP LOCKED`` hands each due saga to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from coordinator.errors import StorageUnavailable
from coordinator.store.repository import SagaStore
from sagaplane import backoff
from sagaplane.runtime import log_crash

log = logging.getLogger(__name__)

TASK_NAME = "sagaplane-timers"


class TimerLoop:
    """Fires due timers every ``interval`` seconds (sooner while there is a backlog)."""

    def __init__(
        self,
        store: SagaStore,
        *,
        interval: float = 0.5,
        batch: int = 200,
        max_backoff: float = 5.0,
        on_round: Callable[[float], None] | None = None,
    ) -> None:
        self._store = store
        # Told the seconds of each round that reached the database (the metrics'
        # histogram): the query's cost is what grows with the sagas waiting.
        self._on_round = on_round
        self._interval = interval
        self._batch = batch
        self._max_backoff = max_backoff
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The loop's task, once started."""
        return self._task

    async def start(self) -> None:
        """Run the loop in a named background task."""
        self._task = asyncio.create_task(self._run(), name=TASK_NAME)
        self._task.add_done_callback(log_crash(log, "timer loop"))

    async def stop(self) -> None:
        """Let the round in progress commit, then stop. Safe to call twice."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            delay = self._interval
            try:
                began = time.perf_counter()
                fired = await self._store.fire_due_timers(self._batch)
                if self._on_round is not None:
                    self._on_round(time.perf_counter() - began)
                failures = 0
                if len(fired) >= self._batch:
                    delay = 0  # a backlog: keep going
            except StorageUnavailable as exc:
                failures += 1
                delay = backoff.delay(failures, maximum=self._max_backoff)
                log.warning("timers: database unavailable (%s); retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
