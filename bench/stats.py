"""Percentiles and summaries, without numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ratio(a: float | None, b: float | None, digits: int | None = 3) -> float | None:
    """``a / b`` rounded to ``digits`` (None: as is), or None when either is missing or
    ``b`` is 0."""
    if a is None or not b:
        return None
    return a / b if digits is None else round(a / b, digits)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100), interpolated linearly; None for no values."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    rank = (p / 100) * (len(data) - 1)
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return data[lo] + (data[hi] - data[lo]) * (rank - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max/mean of durations given in seconds, in milliseconds."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "n": len(seconds),
        "p50": ms(percentile(seconds, 50)),
        "p95": ms(percentile(seconds, 95)),
        "p99": ms(percentile(seconds, 99)),
        "max": ms(max(seconds) if seconds else None),
        "mean": ms(sum(seconds) / len(seconds) if seconds else None),
    }
