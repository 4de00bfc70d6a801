"""Plain-text tables for the report: cells formatted one way everywhere (thousands
separators, a fixed number of digits, ``-`` for a missing figure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def fmt(value: Any, digits: int = 1) -> str:
    """A figure as the report prints it: ``-`` for None, thousands separated."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> list[str]:
    """Lines of a table, indented by two spaces: the first column left-aligned, the
    others right-aligned, a rule under the header."""
    cells = [[str(h) for h in header]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for n, row in enumerate(cells):
        out.append(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out
