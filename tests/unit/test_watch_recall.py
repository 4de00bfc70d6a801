"""WatchSaga's first message from a remembered start (coordinator/api/servicer.py): only
for a watcher that has not seen further than the start."""

from __future__ import annotations

from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.store.notifications import Listener
from helpers.watched import entries, saga


def test_a_watcher_resuming_past_the_start_is_not_given_the_start() -> None:
    listener = Listener("postgresql://unused")
    listener.recent.listening(True)
    listener.recent.watched()
    listener.recent.remember(saga(), entries(7, 8), listener.recent.since())
    servicer = SagaCoordinatorServicer(None, None, listener)  # type: ignore[arg-type]
    whole = servicer._recalled("01SAGA", 0)
    assert whole is not None and [e.position for e in whole[1]] == [7, 8]
    rest = servicer._recalled("01SAGA", 7)
    assert rest is not None and [e.position for e in rest[1]] == [8]
    # It read position 12 from another replica's stream: the start is older than that.
    assert servicer._recalled("01SAGA", 12) is None
