"""Sagas this coordinator just started, remembered for their first watchers.

The commonest WatchSaga opens right after StartSaga returns (``sagaplane start
--watch``, ``SagaClient.wait``, the web page's start): its first message is the saga as
it was just written, which this process still holds. Reading it back from the database
was a third of what a stream cost the coordinator (``python -m bench --phases
watchers``). So a start committed here is remembered with its history entries (their
positions are read inside the start's transaction), for :data:`HORIZON` seconds at most,
and a WatchSaga whose saga is remembered takes its first message from here.

A memory is only as good as the proof that the saga has not changed since. That proof:

- A transition this process commits drops the saga's memory before its COMMIT is sent
  (:meth:`RecentStarts.forget`).
- Another replica's commit is notified (``saga_id:position``, migration 0013) to this
  process's listener, which drops a memory older than the notified position
  (:meth:`RecentStarts.noted`). A notification can arrive *before* the start is
  remembered (the listener may run before the task that committed resumes), so every
  notification is also kept for :data:`HORIZON` seconds, and :meth:`remember` refuses
  a saga notified past the start's position since the start began committing; a start
  that took longer than the horizon to come back is not remembered at all.
- A lost listening connection may have lost notifications: every memory is dropped
  when it listens again, and a start that began committing before that is refused.
- A watcher registers (``Listener.watch``) before it recalls: a notification processed
  after the recall wakes it as for any first read.

Remembering costs each start one more statement (its entries' positions), so it is
done only while WatchSaga is in use on this coordinator (a stream opened within the
last :data:`WATCHED_RECENTLY` seconds). A memory holds what a read at the start's
commit would have shown; like any first read, it shows a command's delivery problem
only if the broker had returned the command by then.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from coordinator.engine.model import HistoryEntry, Saga

HORIZON = 5.0
"""Seconds a start is remembered, and a notification kept to check a start against."""

LIMIT = 4096
"""Starts remembered at most (the oldest are dropped first)."""

WATCHED_RECENTLY = 60.0
"""Starts are remembered while a WatchSaga stream was opened this recently."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Remembered:
    """A saga as its start left it."""

    saga: Saga
    entries: tuple[HistoryEntry, ...]
    """Its whole history so far, oldest first, with positions."""
    at: float
    """When it was remembered (``time.monotonic()``)."""

    @property
    def position(self) -> int:
        """The newest position of its history."""
        return self.entries[-1].position


class RecentStarts:
    """The memory of starts and the notifications that prove it current (see the module
    docstring). Used from one event loop: nothing here awaits."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._remembered: OrderedDict[str, Remembered] = OrderedDict()
        # saga id -> (newest position notified, None if a notification gave none; when)
        self._notified: OrderedDict[str, tuple[int | None, float]] = OrderedDict()
        self._last_watch = float("-inf")
        # Notifications are kept from this moment on (and all were kept since then):
        # a start that began committing earlier cannot be checked.
        self._kept_since = float("inf")
        self._listening = False

    def watched(self) -> None:
        """A WatchSaga stream opened: remember starts (for a while)."""
        now = self._clock()
        if not self.remembering():
            # Starts taken while nobody watched could not be checked: none is kept.
            self._remembered.clear()
            self._notified.clear()
            self._kept_since = now if self._listening else float("inf")
        self._last_watch = now

    def remembering(self) -> bool:
        """Whether starts should be remembered now (WatchSaga is in use)."""
        return self._clock() - self._last_watch < WATCHED_RECENTLY

    def since(self) -> float:
        """The time to give :meth:`remember`: take it before the start commits."""
        return self._clock()

    def remember(self, saga: Saga, entries: Sequence[HistoryEntry], since: float) -> None:
        """The start of ``saga``, committed with ``entries``, which began committing at
        ``since``: remembered unless it cannot be proven current."""
        now = self._clock()
        if not entries or since < self._kept_since or now - since > HORIZON:
            return
        position = entries[-1].position
        notified = self._notified.get(saga.id)
        if notified is not None and (notified[0] is None or notified[0] > position):
            return
        self._remembered[saga.id] = Remembered(saga=saga, entries=tuple(entries), at=now)
        self._remembered.move_to_end(saga.id)
        while len(self._remembered) > LIMIT:
            self._remembered.popitem(last=False)

    def recall(self, saga_id: str) -> Remembered | None:
        """The saga as its start left it, if that is still what it is."""
        found = self._remembered.get(saga_id)
        if found is not None and self._clock() - found.at > HORIZON:
            del self._remembered[saga_id]
            return None
        return found

    def forget(self, saga_ids: Iterable[str]) -> None:
        """These sagas are about to change (a transition of this process)."""
        if self._remembered:
            for saga_id in saga_ids:
                self._remembered.pop(saga_id, None)

    def noted(self, saga_id: str, upto: int | None) -> None:
        """A commit of ``saga_id`` was notified, up to position ``upto`` (None: not said)."""
        found = self._remembered.get(saga_id)
        if found is not None and (upto is None or upto > found.position):
            del self._remembered[saga_id]
        if not self.remembering():
            # Not kept: no start that began committing before now can be checked.
            self._notified.clear()
            self._kept_since = float("inf")
            return
        now = self._clock()
        before = self._notified.get(saga_id)
        newest = None if upto is None or (before is not None and before[0] is None) else upto
        if before is not None and newest is not None and before[0] is not None:
            newest = max(newest, before[0])
        self._notified[saga_id] = (newest, now)
        self._notified.move_to_end(saga_id)
        while self._notified:
            oldest = next(iter(self._notified.values()))
            if now - oldest[1] <= HORIZON:
                break
            self._notified.popitem(last=False)

    def listening(self, listening: bool) -> None:
        """The listening connection was (re)established, or lost: notifications may have
        been lost, so nothing remembered can be trusted, nor a start that began before;
        while it is lost, nothing is remembered."""
        self._listening = listening
        self._remembered.clear()
        self._notified.clear()
        self._kept_since = self._clock() if listening and self.remembering() else float("inf")
