"""The memory of sagas just started (coordinator/store/recent.py): remembered only when
it can be proven current, forgotten as soon as anything says the saga moved on."""

from __future__ import annotations

from coordinator.store.recent import HORIZON, LIMIT, WATCHED_RECENTLY, RecentStarts
from helpers.watched import entries, saga


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listening() -> tuple[RecentStarts, Clock]:
    clock = Clock()
    recent = RecentStarts(clock=clock)
    recent.listening(True)
    recent.watched()
    clock.now += 0.001
    return recent, clock


def test_nothing_is_remembered_until_watchsaga_is_used() -> None:
    clock = Clock()
    recent = RecentStarts(clock=clock)
    recent.listening(True)
    assert not recent.remembering()
    recent.remember(saga(), entries(7), recent.since())
    assert recent.recall("01SAGA") is None
    recent.watched()
    assert recent.remembering()
    clock.now += WATCHED_RECENTLY + 1
    assert not recent.remembering()


def test_a_start_is_recalled_with_its_entries_within_the_horizon() -> None:
    recent, clock = listening()
    since = recent.since()
    recent.remember(saga(), entries(7, 8), since)
    found = recent.recall("01SAGA")
    assert found is not None and found.position == 8
    assert [e.position for e in found.entries] == [7, 8]
    clock.now += HORIZON + 0.1
    assert recent.recall("01SAGA") is None


def test_its_own_notification_keeps_it_a_later_one_drops_it() -> None:
    recent, _ = listening()
    recent.remember(saga(), entries(7, 8), recent.since())
    recent.noted("01SAGA", 8)  # the start's own commit
    assert recent.recall("01SAGA") is not None
    recent.noted("01SAGA", 12)  # another replica's commit
    assert recent.recall("01SAGA") is None


def test_a_notification_without_a_position_drops_it() -> None:
    recent, _ = listening()
    recent.remember(saga(), entries(8), recent.since())
    recent.noted("01SAGA", None)
    assert recent.recall("01SAGA") is None


def test_a_later_commit_notified_before_the_start_is_remembered_refuses_it() -> None:
    # The listener ran before the task that committed the start resumed.
    recent, clock = listening()
    since = recent.since()
    clock.now += 0.002
    recent.noted("01SAGA", 8)
    recent.noted("01SAGA", 12)
    recent.remember(saga(), entries(7, 8), since)
    assert recent.recall("01SAGA") is None
    recent.noted("02SAGA", None)
    recent.remember(saga("02SAGA"), entries(3), since)
    assert recent.recall("02SAGA") is None


def test_a_start_too_slow_to_come_back_is_not_remembered() -> None:
    recent, clock = listening()
    since = recent.since()
    clock.now += HORIZON + 0.1  # its notifications may have left the window
    recent.remember(saga(), entries(8), since)
    assert recent.recall("01SAGA") is None


def test_a_transition_committed_here_forgets_it() -> None:
    recent, _ = listening()
    recent.remember(saga(), entries(8), recent.since())
    recent.forget(["01SAGA"])
    assert recent.recall("01SAGA") is None


def test_a_lost_listening_connection_forgets_all_and_refuses_older_starts() -> None:
    recent, clock = listening()
    before = recent.since()
    recent.remember(saga(), entries(8), before)
    recent.listening(False)
    assert recent.recall("01SAGA") is None
    recent.remember(saga("02SAGA"), entries(9), recent.since())  # not listening: no proof
    assert recent.recall("02SAGA") is None
    clock.now += 0.01
    recent.listening(True)
    recent.remember(saga("03SAGA"), entries(10), before)  # began before: notifications lost
    assert recent.recall("03SAGA") is None
    recent.remember(saga("04SAGA"), entries(11), recent.since())
    assert recent.recall("04SAGA") is not None


def test_the_memory_is_bounded() -> None:
    recent, _ = listening()
    since = recent.since()
    for n in range(LIMIT + 10):
        recent.remember(saga(f"S{n}"), entries(n + 1), since)
    assert recent.recall("S0") is None
    assert recent.recall(f"S{LIMIT + 9}") is not None


def test_notifications_are_kept_only_for_the_horizon() -> None:
    recent, clock = listening()
    recent.noted("01SAGA", 12)
    clock.now += HORIZON + 1
    recent.noted("02SAGA", 3)  # evicts what is older than the horizon
    since = recent.since()
    recent.remember(saga(), entries(8), since)  # 12 was notified before it began
    assert recent.recall("01SAGA") is not None


def test_a_start_committing_as_the_watching_lapses_is_not_remembered() -> None:
    recent, clock = listening()
    since = recent.since()  # a start decides to remember, its COMMIT in flight
    clock.now += WATCHED_RECENTLY + 0.001  # nobody watched for a while: not kept
    recent.noted("01SAGA", 12)  # a later commit of it: not recorded
    recent.remember(saga(), entries(8), since)
    assert recent.recall("01SAGA") is None
    recent.watched()  # watching again: only starts from now on
    recent.remember(saga(), entries(8), since)
    assert recent.recall("01SAGA") is None
    recent.remember(saga("02SAGA"), entries(20), recent.since())
    assert recent.recall("02SAGA") is not None
