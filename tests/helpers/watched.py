"""Sagas and history entries as the store hands them to watchers, for the unit tests of
WatchSaga's hand-over and start memory (only their ids, states and positions matter)."""

from __future__ import annotations

from datetime import UTC, datetime

from coordinator.engine.model import HistoryEntry, Saga, SagaState

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def saga(saga_id: str = "01SAGA", state: SagaState = SagaState.STARTED) -> Saga:
    """A saga without steps, in ``state``."""
    return Saga(
        id=saga_id, name="order.place", state=state, context={}, steps=(),
        created_at=NOW, updated_at=NOW,
    )  # fmt: skip


def entries(*positions: int) -> list[HistoryEntry]:
    """History entries at these positions."""
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
