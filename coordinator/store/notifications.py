"""Which sagas changed, as PostgreSQL announces it: one LISTEN connection per
coordinator, fanned out in memory to every watcher (WatchSaga) of this process.

Migration 0008 makes every committed transition NOTIFY ``sagaplane_history`` with its
saga's id, whichever replica wrote it. A notification carries no data: it only wakes the
saga's watchers, who read what is new from the database, from their own last position.
So a notification that is lost (the listening connection dropped and came back) loses
nothing, as long as every watcher re-reads after a reconnection: the listener wakes them
all each time it starts listening. Nor can a slow watcher make anything pile up here: a
watcher's wake-up is one flag, however many notifications came while it was busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import psycopg
from psycopg import sql

from sagaplane import backoff
from sagaplane.runtime import log_crash

log = logging.getLogger(__name__)

CHANNEL = "sagaplane_history"
"""The channel that migration 0008's trigger notifies, with the saga's id."""

TASK_NAME = "sagaplane-history-listener"
"""The listener's background task, and its connection's application_name."""


class Changes:
    """Wakes its watcher when its saga may have changed (see :meth:`Listener.watch`)."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        self._changed = asyncio.Event()

    def wake(self) -> None:
        """Something may have changed: the next :meth:`wait` returns at once."""
        self._changed.set()

    async def wait(self) -> None:
        """Until something may have changed since the last return; read after it."""
        await self._changed.wait()
        # Cleared before the caller reads, so a commit after its read wakes it again.
        self._changed.clear()


class Listener:
    """LISTENs on ``sagaplane_history`` on one connection of its own and wakes the
    watchers of each saga notified. Reconnects (with :func:`sagaplane.backoff.delay`)
    after losing its connection, then wakes every watcher, so that they catch up."""

    def __init__(self, database_url: str, *, max_backoff: float = 5.0) -> None:
        self._database_url = database_url
        self._max_backoff = max_backoff
        self._watchers: dict[str, set[Changes]] = {}
        self.task: asyncio.Task[None] | None = None
        """The background task, once started."""
        self.connected = asyncio.Event()
        """Set while LISTEN is in effect (tests wait for it)."""

    async def start(self) -> None:
        """Start listening in the background; returns once the first LISTEN is in
        effect (or its first attempt failed: it keeps trying)."""
        if self.task is None:
            self.task = asyncio.create_task(self._listen(), name=TASK_NAME)
            self.task.add_done_callback(log_crash(log, "the history listener"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.connected.wait()

    async def stop(self) -> None:
        """Stop listening and close the connection; safe to call twice."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def watch(self, saga_id: str) -> Iterator[Changes]:
        """Wake-ups for ``saga_id`` while the block runs. Enter it before the first
        read: a commit after that read then always wakes the watcher."""
        changes = Changes(saga_id)
        self._watchers.setdefault(saga_id, set()).add(changes)
        try:
            yield changes
        finally:
            watchers = self._watchers.get(saga_id)
            if watchers is not None:
                watchers.discard(changes)
                if not watchers:
                    del self._watchers[saga_id]

    @property
    def watching(self) -> int:
        """How many watchers are registered (all sagas)."""
        return sum(len(w) for w in self._watchers.values())

    def _wake_all(self) -> None:
        for watchers in self._watchers.values():
            for changes in watchers:
                changes.wake()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._database_url, autocommit=True, application_name=TASK_NAME
                )
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    if failures:
                        log.info("history listener: listening again")
                    failures = 0
                    self.connected.set()
                    # Whatever was committed while nobody listened: everyone re-reads.
                    self._wake_all()
                    async for notification in conn.notifies():
                        for changes in self._watchers.get(notification.payload, ()):
                            changes.wake()
            except psycopg.Error as exc:
                self.connected.clear()
                failures += 1
                delay = backoff.delay(failures, maximum=self._max_backoff)
                log.warning("history listener: %s; reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
