"""Which sagas changed, as PostgreSQL announces it: one LISTEN connection per
coordinator, fanned out in memory to every watcher (WatchSaga) of this process.

Migration 0008 makes every committed transition NOTIFY ``sagaplane_history`` with its
saga's id, whichever replica wrote it. A notification carries no data: it only wakes the
saga's watchers, who read what is new from the database, from their own last position.
So a notification that is lost (the listening connection dropped and came back) loses
nothing, as long as every watcher re-reads after a reconnection: the listener wakes them
all each time it starts listening. Nor can a slow watcher make anything pile up here: a
watcher's wake-up is one flag, however many notifications came while it was busy.

A transition this process committed need not be read back: the store hands it to
:meth:`Listener.committed` with the saga as written, the entries written and the
position the saga's history had before them (all read inside the transaction, under
the saga's row lock, so nothing can come between). A watcher whose last position is
that prior position takes it as is; any other watcher reads from the database as
before. Migration 0013 puts the newest position of each commit in its notification
(``saga_id:position``), so a watcher that has that position already is not woken by
the notification of a commit it was handed. The database read is two thirds of what a
watcher costs the coordinator (``python -m bench --phases watchers --profile``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql

from coordinator.engine.model import HistoryEntry, Saga
from coordinator.store.recent import RecentStarts
from sagaplane import backoff
from sagaplane.runtime import log_crash

log = logging.getLogger(__name__)

CHANNEL = "sagaplane_history"
"""The channel that migration 0008's trigger notifies, with the saga's id."""

TASK_NAME = "sagaplane-history-listener"
"""The listener's background task, and its connection's application_name."""


PUSHED_LIMIT = 256
"""History entries handed to one watcher and not taken yet, at most: past that (a
watcher that does not read), they are dropped and the watcher reads from the database.
Only the newest saga handed over is kept, however many transitions came."""


class Changes:
    """Wakes its watcher when its saga may have changed (see :meth:`Listener.watch`)."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        self._changed = asyncio.Event()
        self.seen = 0
        """The newest history position the watcher has sent (it sets this)."""
        # What was handed over since the last take: one chain of transitions, from
        # position _prior on, or _broken if a link was missing or it grew too long.
        self._prior: int | None = None
        self._saga: Saga | None = None
        self._entries: list[HistoryEntry] = []
        self._broken = False
        self._upto = 0  # the newest position notified
        self._unknown = False  # woken without a position: read whatever there is
        # Commits of this saga by this process between their COMMIT and their hand-over
        # (Listener.expecting): a notification meanwhile is most likely of that commit,
        # which is on its way in memory; it wakes the watcher only once they are through.
        self._expecting = 0
        self._held = False

    def wake(self, upto: int | None = None) -> None:
        """Something may have changed (up to position ``upto``, if known): the next
        :meth:`wait` returns, unless the watcher has sent ``upto`` already by then."""
        if upto is None:
            self._unknown = True
            # Notifications may have been lost (a reconnection): whatever was handed over
            # since cannot show what another replica committed meanwhile, so the next
            # take() sends the watcher to the database.
            self._broken = True
        else:
            self._upto = max(self._upto, upto)
            if self._expecting:
                # The commit being handed over is probably this one: reading it back from
                # the database now would be wasted (see expect()).
                self._held = True
                return
        self._changed.set()

    def expect(self) -> None:
        """This process is committing a transition of the saga, to be handed over by
        :meth:`push`: notifications wait until :meth:`expected`."""
        self._expecting += 1

    def expected(self) -> None:
        """The commit announced by :meth:`expect` was handed over, or failed: a
        notification held meanwhile wakes the watcher now (its position may be of
        another replica's commit; :meth:`wait` skips it if the hand-over covered it)."""
        self._expecting = max(0, self._expecting - 1)
        if not self._expecting and self._held:
            self._held = False
            self._changed.set()

    def push(self, prior: int, saga: Saga, entries: Sequence[HistoryEntry]) -> None:
        """A transition this process committed: ``saga`` as written, with ``entries``,
        which come right after position ``prior`` in its history."""
        if self._prior is None:
            self._prior = prior
        elif not self._entries or prior != self._entries[-1].position:
            self._broken = True
        if not self._broken:
            self._entries += entries
            self._saga = saga
            if not entries or len(self._entries) > PUSHED_LIMIT:
                self._broken = True
        if self._broken:
            self._saga, self._entries = None, []
        self._changed.set()

    def take(self, after: int) -> tuple[Saga, list[HistoryEntry]] | None:
        """What was pushed, if it continues the history from ``after`` with nothing
        missing: the newest saga and every entry after ``after`` (none if the watcher
        has read past the chain already); else None (read the database).

        The chain may begin before ``after``: a watcher's first read can already hold a
        commit that was being handed over while it read. Its links are consecutive
        positions of the saga's history, so ``after`` being one of them (or its start)
        means the entries past it are exactly what the watcher lacks."""
        prior, saga, entries, broken = self._prior, self._saga, self._entries, self._broken
        self._prior, self._saga, self._entries, self._broken = None, None, [], False
        if broken or saga is None or prior is None or after < prior:
            return None
        positions = [e.position for e in entries]
        if self._upto > max(after, positions[-1]):
            # A notification of a later commit (another replica's) came while this
            # chain was handed over: the watcher's next wait() returns for it.
            self._changed.set()
        if after == prior:
            return saga, entries
        if after > positions[-1]:
            return saga, []  # older than what the watcher has sent: nothing new
        if after not in positions:
            return None
        return saga, entries[positions.index(after) + 1 :]

    async def wait(self) -> None:
        """Until something may have changed since the last return; read after it.
        A notification of a position the watcher has sent (:attr:`seen`: it was
        handed that commit) does not count."""
        while True:
            await self._changed.wait()
            # Cleared before the caller reads, so a commit after its read wakes it again.
            self._changed.clear()
            if self._prior is not None or self._unknown or self._upto > self.seen:
                self._unknown = False
                return


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
        self.recent = RecentStarts()
        """Sagas this process just started, for their first watchers (store/recent.py)."""

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
        self.recent.watched()
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

    def watched(self, saga_id: str) -> bool:
        """Whether a watcher of this process follows ``saga_id``."""
        return saga_id in self._watchers

    def committed(
        self, saga_id: str, prior: int, saga: Saga, entries: Sequence[HistoryEntry]
    ) -> None:
        """The store committed a transition of ``saga_id``: hand it to its watchers
        (see the module docstring)."""
        for changes in self._watchers.get(saga_id, ()):
            changes.push(prior, saga, entries)

    @contextlib.contextmanager
    def expecting(self, saga_ids: Sequence[str]) -> Iterator[None]:
        """Around a commit of transitions of ``saga_ids`` and their hand-over
        (:meth:`committed`): the commit's own notification can reach the listener
        before the committing task resumes, and would send its watchers to the database
        for what is about to be handed to them. Notifications of these sagas wait until
        the block ends (however it ends); then any held one wakes its watchers."""
        told = [c for saga_id in saga_ids for c in self._watchers.get(saga_id, ())]
        for changes in told:
            changes.expect()
        try:
            yield
        finally:
            for changes in told:
                changes.expected()

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
                    # Whatever was committed while nobody listened: everyone re-reads,
                    # and nothing remembered can be trusted.
                    self.recent.listening(True)
                    self._wake_all()
                    async for notification in conn.notifies():
                        saga_id, upto = _payload(notification.payload)
                        self.recent.noted(saga_id, upto)
                        for changes in self._watchers.get(saga_id, ()):
                            changes.wake(upto)
            except psycopg.Error as exc:
                self.connected.clear()
                failures += 1
                delay = backoff.delay(failures, maximum=self._max_backoff)
                log.warning("history listener: %s; reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self.recent.listening(False)


def _payload(payload: str) -> tuple[str, int | None]:
    """``saga_id:position`` (migration 0013), or a bare saga id (0008, a replica not
    upgraded yet): the saga and the newest position of the commit, if given."""
    saga_id, _, position = payload.partition(":")
    return saga_id, int(position) if position.isdigit() else None
