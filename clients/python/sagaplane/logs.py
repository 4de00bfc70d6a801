"""Log lines of the coordinator and of participants: structured fields, text or JSON.

A line about a saga carries the saga's id, and the step's name and attempt when it is
about one, as the record attributes ``saga_id``, ``step`` and ``attempt``. They come
from ``extra={...}`` (see :func:`fields`) or, for everything logged while one command
or reply is handled, from :func:`about` (a context variable, so each asyncio task has
its own). :func:`configure` installs one stderr handler whose formatter prints them:

- ``text`` (the default): ``2026-12-01 22:50:01,123 INFO coordinator... message
  [saga_id=01J... step=charge attempt=2]``;
- ``json``: one JSON object per line, with ``time``, ``level``, ``logger``,
  ``message``, those fields when set, ``trace_id`` and ``span_id`` when a span is
  current (:mod:`sagaplane.tracing`), and ``exception`` for a traceback.

Both formatters pass the finished line through :func:`sagaplane.urls.redact`: a
connection string that reached a message by mistake is printed with its password
masked, whatever the caller did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Final

from sagaplane import tracing
from sagaplane.urls import redact

__all__ = [
    "FIELDS",
    "FORMATS",
    "ContextFields",
    "JsonFormatter",
    "TextFormatter",
    "about",
    "configure",
    "fields",
]

FIELDS: Final = ("saga_id", "step", "attempt")
"""The structured fields of a line about a saga, in the order they are shown."""

FORMATS: Final = ("text", "json")
"""What ``--log-format`` (``SAGAPLANE_LOG_FORMAT``) accepts."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"

_NONE: Final[Mapping[str, object]] = MappingProxyType({})
_current: ContextVar[Mapping[str, object]] = ContextVar("sagaplane_log_fields", default=_NONE)


def fields(
    saga_id: str | None, step: str | None = None, attempt: int | None = None
) -> dict[str, object]:
    """``extra=`` for one log call about a saga (None values are left out)."""
    found = {"saga_id": saga_id, "step": step, "attempt": attempt}
    return {k: v for k, v in found.items() if v is not None}


@contextlib.contextmanager
def about(
    saga_id: str | None, step: str | None = None, attempt: int | None = None
) -> Iterator[None]:
    """Every line logged inside (in this task) carries these fields."""
    token = _current.set(fields(saga_id, step, attempt))
    try:
        yield
    finally:
        _current.reset(token)


class ContextFields(logging.Filter):
    """Adds the fields of :func:`about` (and the current trace) to each record.

    On a handler, so that it sees records of every logger. Fields given with ``extra=``
    win over those of the context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _current.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        if not hasattr(record, "trace_id"):
            ids = tracing.current_ids()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None)}


class TextFormatter(logging.Formatter):
    """The human-readable line, with the saga fields in brackets at its end."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        found = _record_fields(record)
        if found:
            shown = " ".join(f"{k}={v}" for k, v in found.items())
            # Before a traceback, if any: the fields belong to the message line.
            head, sep, rest = line.partition("\n")
            line = f"{head} [{shown}]{sep}{rest}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for its keys)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry |= _record_fields(record)
        for name in ("trace_id", "span_id"):
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        # Redacted before encoding: "password=..." runs to the next space, which in JSON
        # would take the closing quote with it.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(
    level: int | str = logging.INFO, format: str = "text", stream: IO[str] | None = None
) -> None:
    """Log to ``stream`` (stderr) at ``level``, as ``format`` (``text`` or ``json``).

    Replaces the root logger's handlers: a program calls it once, at its start.
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    handler.addFilter(ContextFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
