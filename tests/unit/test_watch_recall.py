"""WatchSaga's first message from a remembered start (coordinator/api/servicer.py): only
for a watcher that has not seen further than the start."""

from __future__ import annotations

from datetime import UTC, datetime

from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.engine.model import HistoryEntry, Saga, SagaState
from coordinator.store.notifications import Listener

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def test_a_watcher_resuming_past_the_start_is_not_given_the_start() -> None:
    listener = Listener("postgresql://unused")
    listener.recent.listening(True)
    listener.recent.watched()
    saga = Saga(
        id="01SAGA", name="order.place", state=SagaState.STARTED, context={}, steps=(),
        created_at=NOW, updated_at=NOW,
    )  # fmt: skip
    started = [
        HistoryEntry(
            from_state=None,
            to_state=SagaState.STARTED,
            step_name=None,
            event=event,
            at=NOW,
            position=position,
        )
        for event, position in (("saga_started", 7), ("step_dispatched", 8))
    ]
    listener.recent.remember(saga, started, listener.recent.since())
    servicer = SagaCoordinatorServicer(None, None, listener)  # type: ignore[arg-type]
    whole = servicer._recalled("01SAGA", 0)
    assert whole is not None and [e.position for e in whole[1]] == [7, 8]
    rest = servicer._recalled("01SAGA", 7)
    assert rest is not None and [e.position for e in rest[1]] == [8]
    # It read position 12 from another replica's stream: the start is older than that.
    assert servicer._recalled("01SAGA", 12) is None
