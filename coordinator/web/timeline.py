"""A saga's timeline, read from its history: each attempt of a step's action or of its
compensation as a span from its dispatch to its reply (or to now, while it is in flight).

Pure: the history entries and a clock in, spans out; the page draws them
(:mod:`coordinator.web.pages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sagaplane.sagas import HistoryEntry, Saga

__all__ = ["Span", "Timeline", "timeline"]

_DISPATCHED = {"step_dispatched": "execute", "compensation_dispatched": "compensate"}
# What ends an attempt, by kind, and the outcome it shows as.
_ENDS = {
    "execute": {
        "step_completed": "succeeded",
        "step_attempt_failed": "retried",
        "step_failed": "failed",
    },
    "compensate": {
        "step_compensated": "succeeded",
        "compensation_attempt_failed": "retried",
        "compensation_failed": "failed",
    },
}


@dataclass(frozen=True, kw_only=True)
class Span:
    """One attempt, from dispatch to reply."""

    step: str
    """The step's name."""
    kind: str
    """``execute`` (the action) or ``compensate`` (its undo)."""
    attempt: int
    """1 for the first attempt of this kind."""
    start: datetime
    """When it was dispatched."""
    end: datetime
    """When its reply (or timeout) was recorded; now while it is in flight."""
    outcome: str
    """``succeeded``, ``retried`` (failed, tried again), ``failed`` or ``running``."""
    reason: str
    """The history's text for the end (an error), or empty."""


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """The spans of a saga, and the interval they are drawn over."""

    start: datetime
    end: datetime
    spans: tuple[Span, ...]
    skipped: tuple[str, ...]
    """Steps whose condition was false (never dispatched)."""

    def offset(self, at: datetime) -> float:
        """Where ``at`` falls, as a percentage of the interval (0 to 100)."""
        total = (self.end - self.start).total_seconds()
        if total <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * (at - self.start).total_seconds() / total))


def timeline(saga: Saga, now: datetime) -> Timeline:
    """The spans of ``saga`` (read with its history); ``now`` ends those in flight."""
    return _build(saga.history, saga.created_at, saga.completed_at, now)


def _build(
    history: Sequence[HistoryEntry],
    created: datetime | None,
    completed: datetime | None,
    now: datetime,
) -> Timeline:
    spans: list[Span] = []
    open_: dict[tuple[str, str], tuple[int, datetime]] = {}
    attempts: dict[tuple[str, str], int] = {}
    skipped: list[str] = []
    first = created
    last = created
    for entry in history:
        at = entry.at
        if at is None:
            continue
        first = at if first is None or at < first else first
        last = at if last is None or at > last else last
        if entry.event == "step_skipped":
            skipped.append(entry.step_name)
            continue
        kind = _DISPATCHED.get(entry.event)
        if kind is not None:
            key = (entry.step_name, kind)
            attempts[key] = attempts.get(key, 0) + 1
            open_[key] = (attempts[key], at)
            continue
        for kind, ends in _ENDS.items():
            outcome = ends.get(entry.event)
            key = (entry.step_name, kind)
            if outcome is None or key not in open_:
                continue
            attempt, start = open_.pop(key)
            spans.append(
                Span(
                    step=entry.step_name,
                    kind=kind,
                    attempt=attempt,
                    start=start,
                    end=at,
                    outcome=outcome,
                    reason=entry.reason,
                )
            )
    end = completed or now
    for (step, kind), (attempt, start) in open_.items():
        spans.append(
            Span(
                step=step,
                kind=kind,
                attempt=attempt,
                start=start,
                end=max(end, start),
                outcome="running",
                reason="",
            )
        )
    begin = first or now
    finish = max(end if completed is None else completed, last or begin, begin)
    spans.sort(key=lambda s: s.start)
    return Timeline(start=begin, end=finish, spans=tuple(spans), skipped=tuple(skipped))
