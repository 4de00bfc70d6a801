"""Several SQL statements in one round trip to PostgreSQL.

The statements are bound client-side (:meth:`psycopg.AsyncClientCursor.mogrify`, which
quotes every value with the connection's own escaping) and sent as ONE simple-protocol
query. On a 2-core machine a round trip costs more CPU, in the driver and the event
loop, than a small statement costs PostgreSQL to parse, so the SDK and the coordinator
send ``BEGIN`` with their first statements and ``COMMIT`` with their last ones.

Many rows of one table go in one statement as one parameter: :func:`records` writes
them as a JSON array, which ``jsonb_to_recordset`` turns back into rows in PostgreSQL
(one JSON encoding in C instead of binding every value of every row in Python).

The connection must be in autocommit mode: psycopg would otherwise send a ``BEGIN`` of
its own, in a round trip of its own, before the batch. A statement that fails stops
the batch there and aborts the transaction; the caller rolls back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection
from psycopg.abc import Query
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

__all__ = ["Statement", "records", "render", "rollback_after_error", "run"]

Row = TypeVar("Row")

Statement: TypeAlias = tuple[Query, Mapping[str, Any] | Sequence[Any] | None]
"""A statement and its parameters (None: none)."""


def render(cur: AsyncClientCursor[Any], statements: Iterable[Statement]) -> str:
    """The statements, bound and joined into one query text."""
    # A statement's own trailing ";" would leave an empty statement behind it.
    return ";\n".join(
        cur.mogrify(query, params).rstrip().rstrip(";") for query, params in statements
    )


async def run(cur: AsyncClientCursor[Row], statements: Iterable[Statement]) -> list[list[Row]]:
    """Execute ``statements`` in one round trip; the rows of each that returns rows.

    Statements that return no rows (``BEGIN``, ``UPDATE`` without ``RETURNING``, ...)
    have no entry, so ``[BEGIN, SELECT a, UPDATE, SELECT b]`` gives ``[rows a, rows b]``.
    """
    await cur.execute(render(cur, statements))
    results: list[list[Row]] = []
    while True:
        if cur.description is not None:
            results.append(await cur.fetchall())
        if not cur.nextset():
            return results


async def rollback_after_error(conn: AsyncConnection[Any]) -> None:
    """Roll back the transaction a failed batch left open, if it can be done here.

    A broken connection, or one still in the middle of a query (a cancelled batch), is
    left as it is: the pool discards it when it comes back.
    """
    if conn.broken:
        return
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await conn.rollback()


def records(rows: Iterable[Mapping[str, Any]]) -> str:
    """``rows`` as one JSON array, the parameter of a ``jsonb_to_recordset`` insert.

    Values are written so that the column types of the record definition read them
    back: a :class:`~psycopg.types.json.Jsonb` as its JSON, a datetime in ISO 8601 (for
    ``timestamptz``), bytes as ``\\x`` and hex (for ``bytea``), None as null (SQL NULL).
    """
    return json.dumps(list(rows), default=_json_value, separators=(",", ":"))


def _json_value(value: object) -> object:
    # Called by json.dumps only for what JSON has no type for.
    if isinstance(value, Jsonb):
        return value.obj
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    raise TypeError(f"{type(value).__name__} cannot be sent in records()")
