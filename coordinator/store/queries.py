"""Named SQL statements, loaded once from ``sql/queries.sql``."""

from __future__ import annotations

import re
from importlib import resources

from psycopg import sql

_MARKER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, sql.SQL]:
    text = resources.files("coordinator.store").joinpath("sql/queries.sql").read_text("utf-8")
    parts = _MARKER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {
        name: sql.SQL(body.strip()) for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


QUERIES = _load()


def q(name: str) -> sql.SQL:
    """The statement called ``name``; KeyError for a typo, at the first call."""
    return QUERIES[name]
