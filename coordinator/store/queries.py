"""Named SQL statements, loaded once from ``sql/queries.sql`` (see :mod:`sagaplane.queries`)."""

from __future__ import annotations

from psycopg import sql

from sagaplane.queries import load

QUERIES = load("coordinator.store", "sql/queries.sql")


def q(name: str) -> sql.SQL:
    """The statement called ``name``; KeyError for a typo, at the first call."""
    return QUERIES[name]
