"""sagaplane.batch against the real PostgreSQL: values survive client-side binding,
each row-returning statement gets its rows, and a failing statement stops the batch."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import AsyncClientCursor
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from helpers.database import server_url
from sagaplane import batch


@pytest.fixture
async def conn() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(server_url("postgres"), autocommit=True) as c:
        yield c


async def test_awkward_values_come_back_unchanged(conn: psycopg.AsyncConnection[Any]) -> None:
    values = {
        "text": 'it\'s 100% \\ "quoted"; DROP TABLE x; --',
        "json": Jsonb({"a": "50% o'k", "n": [1, 2.5, None], "nested": {"\\": "'"}}),
        "bytes": b"\x00\xff'\\%",
        "when": datetime.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=datetime.UTC),
        "none": None,
        "flag": False,
        "ids": ["a'b", "c"],
    }
    cur = AsyncClientCursor(conn)
    [[row]] = await batch.run(
        cur,
        [
            (
                "SELECT %(text)s, %(json)s, %(bytes)s, %(when)s, %(none)s, %(flag)s,"
                " %(ids)s::text[]",
                values,
            )
        ],
    )
    assert row == (
        values["text"],
        {"a": "50% o'k", "n": [1, 2.5, None], "nested": {"\\": "'"}},
        values["bytes"],
        values["when"],
        None,
        False,
        ["a'b", "c"],
    )


async def test_rows_of_each_statement_that_returns_rows_in_order(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    cur = AsyncClientCursor(conn)
    results = await batch.run(
        cur,
        [
            ("BEGIN", None),
            ("CREATE TEMP TABLE t (n int) ON COMMIT DROP", None),
            ("SELECT 1 AS one", None),
            ("INSERT INTO t SELECT generate_series(1, %s)", (3,)),
            ("SELECT n FROM t ORDER BY n", None),
            ("INSERT INTO t VALUES (4) RETURNING n", None),
            ("COMMIT", None),
        ],
    )
    assert results == [[(1,)], [(1,), (2,), (3,)], [(4,)]]
    assert conn.info.transaction_status == TransactionStatus.IDLE


async def test_a_failing_statement_stops_the_batch_and_aborts_the_transaction(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    await conn.execute("CREATE TEMP TABLE seen (n int)")
    cur = AsyncClientCursor(conn)
    with pytest.raises(psycopg.errors.DivisionByZero):
        await batch.run(
            cur,
            [
                ("BEGIN", None),
                ("INSERT INTO seen VALUES (1)", None),
                ("SELECT 1 / 0", None),
                ("INSERT INTO seen VALUES (2)", None),
                ("COMMIT", None),
            ],
        )
    assert conn.info.transaction_status == TransactionStatus.INERROR
    await conn.rollback()
    count = await (await conn.execute("SELECT count(*) FROM seen")).fetchone()
    assert count == (0,)


async def test_records_come_back_unchanged_through_jsonb_to_recordset(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    when = datetime.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=datetime.UTC)
    rows = [
        {
            "t": 'it\'s 100% \\ "quoted"; é 😀 %(x)s',
            "j": Jsonb({"a": [1, 2.5, None, "%s"], "b": {"\\": "'"}}),
            "b": b"\x00\xff'\\%",
            "w": when,
            "n": None,
            "a": [0, 2],
        },
        {"t": "", "j": Jsonb({}), "b": b"", "w": None, "n": None, "a": None},
    ]
    cur = AsyncClientCursor(conn)
    [back] = await batch.run(
        cur,
        [
            (
                "SELECT * FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb)"
                " AS (t text, j jsonb, b bytea, w timestamptz, n jsonb, a integer[]))"
                " WITH ORDINALITY AS r (t, j, b, w, n, a, i) ORDER BY i",
                {"rows": batch.records(rows)},
            )
        ],
    )
    assert back == [
        (rows[0]["t"], rows[0]["j"].obj, rows[0]["b"], when, None, [0, 2], 1),
        ("", {}, b"", None, None, None, 2),
    ]
