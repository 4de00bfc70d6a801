"""The store's SQL against a migrated database: one definition of the active states,
and the queries that must stay cheap still use their partial indexes."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import ClientCursor

from coordinator.engine import ACTIVE_STATES, SagaState
from coordinator.store.queries import q

ACTIVE_INDEXES = {"sagaplane_sagas_active", "sagaplane_sagas_active_by_name"}


def _connect(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(database_url, autocommit=True, cursor_factory=ClientCursor)


def test_the_database_and_the_engine_agree_on_the_active_states(database_url: str) -> None:
    with _connect(database_url) as conn:
        for state in SagaState:
            row = conn.execute("SELECT sagaplane_saga_is_active(%s)", (state.value,)).fetchone()
            assert row is not None and row[0] is (state in ACTIVE_STATES), state
        for index in sorted(ACTIVE_INDEXES):
            row = conn.execute(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
                " WHERE indexrelid = %s::regclass",
                (index,),
            ).fetchone()
            assert row is not None
            assert set(re.findall(r"'(\w+)'", row[0])) == {s.value for s in ACTIVE_STATES}


@pytest.mark.parametrize(
    ("query", "params", "indexes"),
    [
        # Either partial index of the active sagas proves the condition matched theirs.
        ("list_active", {"after": "~", "name": None}, ACTIVE_INDEXES),
        ("list_active_by_name", {"after": "~", "name": "order"}, ACTIVE_INDEXES),
        ("due_step_timers", {}, {"sagaplane_steps_deadline"}),
        ("due_saga_deadlines", {}, {"sagaplane_sagas_deadline"}),
    ],
)
def test_the_cheap_queries_use_their_partial_indexes(
    database_url: str, query: str, params: dict[str, Any], indexes: set[str]
) -> None:
    params = params | {"limit": 50, "stale_for": timedelta(0)}
    with _connect(database_url) as conn:
        # With sequential scans priced out, a plan shows which indexes the query can use.
        conn.execute("SET enable_seqscan = off")
        cur = conn.cursor()
        text = cur.mogrify(q(query), params)
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN {text}".encode()))
    used = set(re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\w+)", plan))
    used |= set(re.findall(r"Bitmap Index Scan on (\w+)", plan))
    assert used & indexes, plan
