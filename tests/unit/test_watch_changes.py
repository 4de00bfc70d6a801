"""WatchSaga's in-process path (coordinator/store/notifications.py): a watcher takes a
transition handed over by its own coordinator only when it continues exactly where the
watcher is; anything else sends it back to the database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from coordinator.engine.model import HistoryEntry, Saga, SagaState
from coordinator.store.notifications import PUSHED_LIMIT, Changes, _payload

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def saga(state: SagaState = SagaState.STARTED) -> Saga:
    return Saga(
        id="01SAGA", name="order.place", state=state, context={}, steps=(),
        created_at=NOW, updated_at=NOW,
    )  # fmt: skip


def entries(*positions: int) -> list[HistoryEntry]:
    return [
        HistoryEntry(
            from_state=SagaState.STARTED,
            to_state=SagaState.STARTED,
            step_name="a",
            event="step_completed",
            at=NOW,
            position=p,
        )
        for p in positions
    ]


def test_a_contiguous_chain_is_taken_whole() -> None:
    changes = Changes("01SAGA")
    first, last = saga(), saga(SagaState.COMPLETED)
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
