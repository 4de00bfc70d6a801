"""Durations: the one parser of the forms people write, and the protobuf conversion.

:func:`parse_duration` reads what a saga file, a flag or an environment variable may
say (``10s``, ``1m30s``, ``10 seconds``, ``1.5``, ``2h``, ``500ms``, a number of
seconds); :func:`to_duration` makes the protobuf ``Duration`` of seconds or a
``timedelta``. The CLI (``--stale-for``), saga files (every ``Duration`` field of the
StartSaga request, see :mod:`sagaplane.jsonform`) and the SDK's own arguments all go
through these two.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from google.protobuf import duration_pb2

__all__ = ["FORMS", "parse_duration", "to_duration"]

FORMS = (
    "a number of seconds (10, 1.5) or amounts with units (10s, 1m30s, 2h, 1d, 500ms, 10 seconds)"
)
"""What :func:`parse_duration` accepts, as its errors say."""

_UNITS: dict[str, float] = {
    **dict.fromkeys(("ms", "msec", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)", re.IGNORECASE)
_PLAIN = re.compile(rf"\s*{_NUMBER}\s*")


def parse_duration(value: str | float | timedelta) -> timedelta:
    """A duration from seconds, a ``timedelta`` or text such as ``1m30s`` or ``10 seconds``.

    Raises ValueError, saying which forms are accepted (:data:`FORMS`), for anything
    else, and for a negative or non-finite duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration; use {FORMS}")
    elif isinstance(value, str):
        seconds = _seconds_of(value)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"a duration must not be negative, not {value!r}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{value!r} is too long for a duration") from None


def _seconds_of(text: str) -> float:
    if _PLAIN.fullmatch(text):
        return float(text)
    seconds, at = 0.0, 0
    for match in _PART.finditer(text):
        unit = _UNITS.get(match.group(2).lower())
        if match.start() != at or unit is None:
            break
        seconds += float(match.group(1)) * unit
        at = match.end()
    else:
        if at and not text[at:].strip():
            return seconds
    negative = text.strip().startswith("-")
    problem = "must not be negative" if negative else "is not a duration"
    raise ValueError(f"{text!r} {problem}; use {FORMS}")


def to_duration(value: float | timedelta) -> duration_pb2.Duration:
    """A protobuf Duration of seconds or a timedelta (ValueError if negative)."""
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta < timedelta(0):
        raise ValueError(f"a duration must not be negative, not {delta}")
    duration = duration_pb2.Duration()
    duration.FromTimedelta(delta)
    return duration
