"""WatchSaga's in-process path (coordinator/store/notifications.py): a watcher takes a
transition handed over by its own coordinator only when it continues exactly where the
watcher is; anything else sends it back to the database."""

from __future__ import annotations

import asyncio

from coordinator.engine.model import SagaState
from coordinator.store.notifications import PUSHED_LIMIT, Changes, _payload
from helpers.watched import entries, saga


def test_a_contiguous_chain_is_taken_whole() -> None:
    changes = Changes("01SAGA")
    first, last = saga(), saga(state=SagaState.COMPLETED)
    changes.push(8, first, entries(9, 10))
    changes.push(10, last, entries(14))
    taken = changes.take(8)
    assert taken is not None
    assert taken[0] is last
    assert [e.position for e in taken[1]] == [9, 10, 14]
    assert changes.take(14) is None  # taken once


def test_a_gap_sends_the_watcher_to_the_database() -> None:
    changes = Changes("01SAGA")
    changes.push(9, saga(), entries(10))  # the watcher has 8: 9 was another replica's
    assert changes.take(8) is None
    changes.push(8, saga(), entries(9))
    changes.push(11, saga(), entries(12))  # 10..11 missing
    assert changes.take(8) is None


def test_a_first_read_that_holds_part_of_the_chain_takes_the_rest() -> None:
    # The watcher's first read ran while commits 9 and 10 were being handed over and
    # already saw 9: it lacks only 10, and needs no second read.
    changes = Changes("01SAGA")
    last = saga(state=SagaState.COMPLETED)
    changes.push(8, saga(), entries(9))
    changes.push(9, last, entries(10))
    taken = changes.take(9)
    assert taken is not None
    assert taken[0] is last
    assert [e.position for e in taken[1]] == [10]


def test_a_chain_the_watcher_has_read_past_is_nothing_new() -> None:
    changes = Changes("01SAGA")
    changes.push(8, saga(), entries(9, 10))
    taken = changes.take(12)
    assert taken is not None
    assert taken[1] == []


def test_a_position_that_is_not_a_link_of_the_chain_reads_the_database() -> None:
    changes = Changes("01SAGA")
    changes.push(8, saga(), entries(10, 12))
    assert changes.take(11) is None


async def test_a_notification_during_a_hand_over_waits_for_it() -> None:
    changes = Changes("01SAGA")
    changes.seen = 8
    changes.expect()
    changes.wake(10)  # the commit's own notification, ahead of its hand-over
    waiting = asyncio.ensure_future(changes.wait())
    await asyncio.sleep(0)
    assert not waiting.done()  # held: no read of what is about to be handed over
    changes.push(8, saga(), entries(10))
    changes.expected()
    await asyncio.wait_for(waiting, 1)
    taken = changes.take(8)
    assert taken is not None and [e.position for e in taken[1]] == [10]
    changes.seen = 10
    # Nothing is left to wake for: the held notification was the commit handed over.
    again = asyncio.ensure_future(changes.wait())
    await asyncio.sleep(0)
    assert not again.done()
    again.cancel()


async def test_a_held_notification_of_another_commit_wakes_after_the_hand_over() -> None:
    changes = Changes("01SAGA")
    changes.seen = 8
    changes.expect()
    changes.wake(12)  # another replica's commit, after the one being handed over
    changes.push(8, saga(), entries(10))
    changes.expected()
    await asyncio.wait_for(changes.wait(), 1)
    taken = changes.take(8)
    assert taken is not None
    changes.seen = 10
    await asyncio.wait_for(changes.wait(), 1)  # 12 is still to be read


async def test_a_failed_commit_releases_a_held_notification() -> None:
    changes = Changes("01SAGA")
    changes.seen = 8
    changes.expect()
    changes.wake(10)
    changes.expected()  # the commit failed: nothing is handed over
    await asyncio.wait_for(changes.wait(), 1)
    assert changes.take(8) is None  # the watcher reads the database


async def test_a_reconnection_is_never_held() -> None:
    changes = Changes("01SAGA")
    changes.expect()
    changes.wake(None)
    await asyncio.wait_for(changes.wait(), 1)


def test_nothing_pushed_is_nothing_taken() -> None:
    assert Changes("01SAGA").take(0) is None


def test_a_watcher_that_does_not_take_reads_the_database() -> None:
    changes = Changes("01SAGA")
    for position in range(PUSHED_LIMIT + 5):
        changes.push(position, saga(), entries(position + 1))
    assert changes.take(0) is None


async def test_a_notification_of_what_was_sent_already_does_not_wake() -> None:
    changes = Changes("01SAGA")
    changes.wake(10)  # the commit the watcher was handed, notified before it sent it
    changes.seen = 10
    changes.wake(7)
    waiting = asyncio.ensure_future(changes.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    changes.wake(11)
    await asyncio.wait_for(waiting, 1)
    changes.wake(None)  # a reconnection: always
    await asyncio.wait_for(changes.wait(), 1)


def test_payloads_old_and_new() -> None:
    assert _payload("01SAGA:42") == ("01SAGA", 42)
    assert _payload("01SAGA") == ("01SAGA", None)
    assert _payload("01SAGA:x") == ("01SAGA", None)


async def test_a_reconnection_sends_the_watcher_to_the_database_despite_a_hand_over() -> None:
    # The listener lost its connection: another replica's commit may have gone unnotified,
    # so a chain handed over meanwhile must not stand in for a read.
    changes = Changes("01SAGA")
    changes.push(8, saga(), entries(9))
    changes.wake(None)
    await asyncio.wait_for(changes.wait(), 1)
    assert changes.take(8) is None
    changes.push(9, saga(), entries(10))  # after the read: handed over as usual
    taken = changes.take(9)
    assert taken is not None and [e.position for e in taken[1]] == [10]
