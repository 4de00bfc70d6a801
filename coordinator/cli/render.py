"""Sagas as text for people, and as JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from sagaplane.structs import integral
from sagaplane.v1 import saga_pb2


def saga_state(value: int) -> str:
    """``SAGA_STATE_COMPENSATED`` -> ``compensated`` (also for a state newer than this CLI)."""
    return _enum_word(saga_pb2.SagaState, value, "SAGA_STATE_")


def step_status(value: int) -> str:
    """``STEP_STATUS_COMPLETED`` -> ``completed``."""
    return _enum_word(saga_pb2.StepStatus, value, "STEP_STATUS_")


def _enum_word(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return f"unknown({value})"
    return name.removeprefix(prefix).lower()


def to_json(message: Any) -> Any:
    """A protobuf message as a JSON value: proto field names, enums by name, and integral
    numbers inside Structs as integers (``{"qty": 2}``, not ``2.0``)."""
    return integral(json_format.MessageToDict(message, preserving_proto_field_name=True))


def dumps(value: Any) -> str:
    """Indented JSON, as printed by ``--json``."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def compact(message: Any) -> str:
    """A Struct (or any message) as one line of JSON; empty for an empty one."""
    value = to_json(message)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": ")) if value else ""


def timestamp(ts: timestamp_pb2.Timestamp) -> datetime | None:
    """A Timestamp as an aware datetime; None when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def when(ts: timestamp_pb2.Timestamp) -> str:
    """A Timestamp as ``2025-01-31 12:00:00.123Z``; ``-`` when unset."""
    at = timestamp(ts)
    return (
        "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    )


def ago(ts: timestamp_pb2.Timestamp, now: datetime) -> str:
    """How long before ``now``: ``3.2s ago``, ``5m ago``, ``2h ago``, ``4d ago``."""
    at = timestamp(ts)
    if at is None:
        return "-"
    seconds = max(0.0, (now - at).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h ago"
    return f"{seconds // 86400:.0f}d ago"


EVENT_WIDTH = len("compensation_attempt_failed")
"""The event column of transitions printed as they happen (``watch``): as wide as the
longest event that a saga can record while it is watched. The wider ones, an
operator's ``compensation_resolved_*``, only follow a ``compensation_failed``, where a
watch ends, so they are only ever in what a watch finds when it begins, and
:func:`event_width` makes room for them then."""


def event_width(history: Iterable[saga_pb2.HistoryEntry]) -> int:
    """The event column's width for a watch that begins with ``history``."""
    return max([EVENT_WIDTH, *(len(entry.event) for entry in history)])


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "") -> str:
    """Columns aligned on the widest cell; the last column is not padded."""
    body = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(headers))]
    lines = []
    for row in body:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def current_step(saga: saga_pb2.Saga) -> str:
    """The step the saga is busy with (or stopped at), as ``name (status)``."""
    busy = {
        saga_pb2.STEP_STATUS_STARTED,
        saga_pb2.STEP_STATUS_COMPENSATING,
        saga_pb2.STEP_STATUS_FAILED,
        saga_pb2.STEP_STATUS_COMPENSATION_FAILED,
    }
    for step in saga.steps:
        if step.status in busy or step_status(step.status).endswith("retrying"):
            return f"{step.name} ({step_status(step.status)})"
    return "-"


_UNDOING = frozenset(
    {
        saga_pb2.STEP_STATUS_COMPENSATING,
        saga_pb2.STEP_STATUS_COMPENSATION_RETRYING,
        saga_pb2.STEP_STATUS_COMPENSATION_FAILED,
    }
)
_UNDO_STATES = frozenset(
    {
        saga_pb2.SAGA_STATE_COMPENSATING,
        saga_pb2.SAGA_STATE_COMPENSATED,
        saga_pb2.SAGA_STATE_COMPENSATION_FAILED,
    }
)


def progress(saga: saga_pb2.Saga) -> str:
    """The DONE column: ``2/3``, the steps done (completed, or skipped: nothing is left
    to do for them) out of all; while a saga is undone, ``1/2 undone``, the steps
    compensated out of those that have something to undo."""
    if saga.state in _UNDO_STATES:
        undoable = [s for s in saga.steps if _has_something_to_undo(s)]
        undone = sum(1 for s in undoable if s.status == saga_pb2.STEP_STATUS_COMPENSATED)
        return f"{undone}/{len(undoable)} undone"
    done = {saga_pb2.STEP_STATUS_COMPLETED, saga_pb2.STEP_STATUS_SKIPPED}
    return f"{sum(1 for s in saga.steps if s.status in done)}/{len(saga.steps)}"


def _has_something_to_undo(step: saga_pb2.Step) -> bool:
    """Undone, being undone, or waiting to be: a step with a compensation whose action
    completed (or failed with an unknown outcome: it may have taken effect)."""
    if not step.compensation:
        return False
    return (
        step.status in _UNDOING
        or step.status in (saga_pb2.STEP_STATUS_COMPLETED, saga_pb2.STEP_STATUS_COMPENSATED)
        or (step.status == saga_pb2.STEP_STATUS_FAILED and step.outcome_unknown)
    )


def attempts(step: saga_pb2.Step) -> str:
    """The ATTEMPTS column: ``2`` attempts of the action; ``1, undo 3`` once its
    compensation ran too (3 attempts of it)."""
    text = str(step.attempts)
    return f"{text}, undo {step.compensation_attempts}" if step.compensation_attempts else text


def result(step: saga_pb2.Step) -> str:
    """The RESULT column: what happened to the step, in its status's terms.

    The step's ``error`` is its last failure, of the action or of its compensation; it
    is shown only while it still matters (a compensated step shows that it was undone,
    not the error of an undo attempt that was then retried).
    """
    output = compact(step.output) if step.HasField("output") else ""
    status = step.status
    if step.delivery_problem:
        # The command in flight reaches nobody: what to fix comes before anything else.
        return step.delivery_problem
    if status == saga_pb2.STEP_STATUS_COMPENSATED:
        tries = step.compensation_attempts
        parts = [
            "undone" if tries <= 1 else f"undone after {tries} attempts",
            f"output was {output}" if output else "",
        ]
        return "; ".join(p for p in parts if p)
    if status == saga_pb2.STEP_STATUS_COMPENSATION_FAILED:
        return f"undo failed: {step.error}" if step.error else "undo failed"
    if status == saga_pb2.STEP_STATUS_COMPENSATION_RETRYING:
        return f"undo failed, retrying: {step.error}" if step.error else "undo retrying"
    if status == saga_pb2.STEP_STATUS_COMPENSATING:
        if step.compensation_attempts > 1 and step.error:
            return f"undoing (last undo error: {step.error})"
        return "undoing" + (f"; output {output}" if output else "")
    if step.error and status in (saga_pb2.STEP_STATUS_FAILED, saga_pb2.STEP_STATUS_RETRYING):
        return f"error: {step.error}"
    if step.error and status == saga_pb2.STEP_STATUS_STARTED:
        return f"last error: {step.error}"
    # Completed (after retries too: its output, not the error an earlier attempt left).
    return output


def saga_text(saga: saga_pb2.Saga, *, history: bool = False) -> str:
    """A saga for people: a header, its steps, and (when asked) its history."""
    lines = [
        f"saga      {saga.id}",
        f"name      {saga.name}",
        f"state     {saga_state(saga.state)}",
        f"created   {when(saga.created_at)}",
        f"updated   {when(saga.updated_at)}",
    ]
    if timestamp(saga.completed_at) is not None:
        lines.append(f"ended     {when(saga.completed_at)}")
    if saga.idempotency_key:
        lines.append(f"key       {saga.idempotency_key}")
    if saga.context.fields:
        lines.append(f"context   {compact(saga.context)}")
    lines += ["", step_table(saga)]
    if history:
        lines += ["", history_table(saga.history)]
    return "\n".join(lines)


def step_table(saga: saga_pb2.Saga) -> str:
    """The steps: what they run, where they are, and what they returned or failed with;
    for a saga whose steps do not simply follow each other, what each waits for, and
    for one with conditional steps, their conditions."""
    graph = any(
        list(step.depends_on) != ([saga.steps[i - 1].name] if i else [])
        for i, step in enumerate(saga.steps)
    )
    conditional = any(step.when for step in saga.steps)
    rows = []
    for i, step in enumerate(saga.steps, 1):
        rows.append(
            [
                str(i),
                step.name,
                step.action,
                step.compensation or "-",
                *([", ".join(step.depends_on) or "-"] if graph else []),
                *([step.when or "-"] if conditional else []),
                step_status(step.status),
                attempts(step),
                result(step),
            ]
        )
    extra = (["AFTER"] if graph else []) + (["WHEN"] if conditional else [])
    headers = ["#", "STEP", "ACTION", "COMPENSATION", *extra, "STATUS", "ATTEMPTS", "RESULT"]
    return table(headers, rows)


def history_table(entries: Iterable[saga_pb2.HistoryEntry]) -> str:
    """Every transition, oldest first, with the time since the first one."""
    entries = list(entries)
    start = timestamp(entries[0].at) if entries else None
    rows = [history_row(e, start) for e in entries]
    return table(["AT", "+ELAPSED", "EVENT", "STEP", "STATE", "DETAIL"], rows)


def history_row(entry: saga_pb2.HistoryEntry, start: datetime | None) -> list[str]:
    """One transition as table cells (see :func:`history_table`)."""
    return [
        when(entry.at),
        elapsed(entry, start),
        entry.event,
        entry.step_name or "-",
        transition(entry),
        detail(entry),
    ]


def detail(entry: saga_pb2.HistoryEntry) -> str:
    """The reason given, and who caused the transition when known (``by ci``)."""
    if not entry.caller:
        return entry.reason
    return f"{entry.reason} (by {entry.caller})" if entry.reason else f"by {entry.caller}"


def elapsed(entry: saga_pb2.HistoryEntry, start: datetime | None) -> str:
    """``+0.042s``: time since ``start`` (the saga's first transition)."""
    at = timestamp(entry.at)
    if at is None or start is None:
        return "-"
    return f"+{(at - start).total_seconds():.3f}s"


def transition(entry: saga_pb2.HistoryEntry) -> str:
    """``started -> compensating``, or one word when the state did not change."""
    before, after = saga_state(entry.from_state), saga_state(entry.to_state)
    if entry.from_state == saga_pb2.SAGA_STATE_UNSPECIFIED or before == after:
        return after
    return f"{before} -> {after}"


def sagas_table(sagas: Sequence[saga_pb2.Saga], now: datetime) -> str:
    """Sagas one per line, for ``list``."""
    rows = [
        [s.id, s.name, saga_state(s.state), progress(s), current_step(s), ago(s.updated_at, now)]
        for s in sagas
    ]
    return table(["ID", "NAME", "STATE", "DONE", "AT STEP", "UPDATED"], rows)
