"""Counting a connection's round trips to PostgreSQL, from what went over the wire.

libpq's protocol trace (``PQtrace``, through psycopg's ``pgconn.trace``) writes one line
per message in either direction. The server ends its answer to every simple Query
message, and to every Sync of the extended protocol (a pipeline's, or one
``execute``'s), with one ReadyForQuery: counting those counts the times the client
waited for the server, whatever psycopg or a handler does in between.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection, pq

_MESSAGE = re.compile(r"^([FB])\t\d+\t(\w+)")


@dataclass
class Trips:
    """What one traced stretch of a connection sent and received."""

    messages: list[tuple[str, str, str]] = field(default_factory=list)
    """Every message: direction (``F`` from the client, ``B`` from the server), type
    (``Query``, ``Parse``, ``Execute``, ``ReadyForQuery``, ...) and its trace text."""

    @property
    def count(self) -> int:
        """Round trips: the server's ReadyForQuery messages."""
        return sum(1 for d, kind, _ in self.messages if (d, kind) == ("B", "ReadyForQuery"))

    def sent(self) -> list[list[tuple[str, str]]]:
        """What the client sent in each round trip: (type, text) of each message."""
        trips: list[list[tuple[str, str]]] = [[]]
        for direction, kind, text in self.messages:
            if direction == "F":
                trips[-1].append((kind, text))
            elif kind == "ReadyForQuery":
                trips.append([])
        return [t for t in trips if t]


def parse(trace: str) -> list[tuple[str, str, str]]:
    """The messages of a libpq trace (a Query's text may span several lines)."""
    messages: list[tuple[str, str, str]] = []
    for line in trace.splitlines():
        match = _MESSAGE.match(line)
        if match:
            messages.append((match[1], match[2], line))
        elif messages:
            direction, kind, text = messages[-1]
            messages[-1] = (direction, kind, f"{text}\n{line}")
    return messages


@contextmanager
def round_trips(conn: AsyncConnection[Any]) -> Iterator[Trips]:
    """Trace ``conn`` while the block runs; the :class:`Trips` is filled on exit."""
    trips = Trips()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace"
        with path.open("w") as out:
            conn.pgconn.trace(out.fileno())
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            try:
                yield trips
            finally:
                conn.pgconn.untrace()  # flushes what libpq buffered
        trips.messages = parse(path.read_text())
