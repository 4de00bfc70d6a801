"""Named SQL statements, kept in ``.sql`` files and loaded once, at import.

A file holds statements one after another, each after a ``-- name: <name>`` line.
Comment lines before and after a statement (why it is as it is, section headings) are
documentation and are not sent. Parameters are always bound (``%(name)s`` or ``%s``),
never formatted in.

The SDK's statements are in ``sql/queries.sql`` (:func:`q`); the coordinator's store
loads its own file with :func:`load`.
"""

from __future__ import annotations

import re
from importlib import resources

from psycopg import sql

__all__ = ["load", "q"]

_MARKER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load(package: str, path: str) -> dict[str, sql.SQL]:
    """The statements of ``package``/``path`` by name; ValueError for a name used twice."""
    text = resources.files(package).joinpath(path).read_text("utf-8")
    parts = _MARKER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    statements: dict[str, sql.SQL] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in statements:
            raise ValueError(f"{package}/{path}: two statements are called {name!r}")
        statements[name] = sql.SQL(_statement(body))
    return statements


def _statement(body: str) -> str:
    """``body`` without the comment and blank lines around it."""
    lines = body.splitlines()
    while lines and _documentation(lines[0]):
        del lines[0]
    while lines and _documentation(lines[-1]):
        del lines[-1]
    return "\n".join(lines)


def _documentation(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("--")


_QUERIES = load("sagaplane", "sql/queries.sql")


def q(name: str) -> sql.SQL:
    """The SDK's statement called ``name``; KeyError for a typo (at import, where used)."""
    return _QUERIES[name]
