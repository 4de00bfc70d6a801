"""Where a saga's latency goes, leg by leg, from the timestamps the system already writes.

Every timestamp below is ``now()`` of some transaction, i.e. its START, read from one
PostgreSQL server (one clock) across the coordinator's and the participants' databases:

- command outbox row ``created_at``: the coordinator transition that dispatched the step;
- command outbox row ``sent_at``: the coordinator relay's claim transaction that sent it;
- participant inbox row ``received_at``: the participant transaction that handled it;
- reply outbox row ``sent_at``: the participant relay's claim transaction;
- the coordinator's ``step_completed`` / ``saga_completed`` history row ``at``: the
  transition that applied the reply (which also dispatches the next step).

So each leg also holds the commit (fsync) that ends the transaction it starts from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from bench.stats import summary_ms

LEGS = {
    "start": "StartSaga request due -> its transaction starts",
    "dispatch": "transition starts -> coordinator relay claims the command "
    "(commit, NOTIFY, relay wake-up)",
    "deliver": "relay claims -> participant transaction starts "
    "(claim, publish, broker, delivery, task + pool)",
    "handle": "participant transaction starts -> its relay claims the reply "
    "(handler tx, commit, NOTIFY, relay wake-up)",
    "reply": "participant relay claims -> coordinator applies the reply "
    "(publish, broker, delivery, batching)",
}


async def _rows(url: str, query: str, params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        return list(await (await c.execute(query, params)).fetchall())


async def breakdown(
    coordinator_url: str,
    participant_urls: Mapping[str, str],
    due: Mapping[str, float],
) -> dict[str, Any]:
    """Per leg (see :data:`LEGS`), p50/p95/p99 over every step of the given sagas
    (``due``: saga id -> when its StartSaga was due, epoch s)."""
    ids = list(due)
    commands = await _rows(
        coordinator_url,
        """
        SELECT o.correlation_id, split_part(o.message_id, ':', 1), s.name,
               o.created_at, o.sent_at
        FROM sagaplane_outbox o JOIN sagaplane_steps s
          ON s.saga_id = o.correlation_id AND s.id = split_part(o.message_id, ':', 1)
        WHERE o.correlation_id = ANY(%s) AND o.message_id LIKE '%%:execute:1'
        """,
        (ids,),
    )
    applied = {
        (saga_id, step_name): at
        for saga_id, step_name, at in await _rows(
            coordinator_url,
            """
            SELECT saga_id, step_name, min(at) FROM sagaplane_history
            WHERE saga_id = ANY(%s) AND step_name IS NOT NULL
              AND event IN ('step_completed', 'saga_completed', 'step_failed')
            GROUP BY saga_id, step_name
            """,
            (ids,),
        )
    }
    created = {
        saga_id: at
        for saga_id, at in await _rows(
            coordinator_url,
            "SELECT id, created_at FROM sagaplane_sagas WHERE id = ANY(%s)",
            (ids,),
        )
    }
    step_ids = [row[1] for row in commands]
    received: dict[str, Any] = {}
    replied: dict[str, Any] = {}
    for url in participant_urls.values():
        for step_id, at in await _rows(
            url,
            "SELECT step_id, received_at FROM sagaplane_inbox "
            "WHERE step_id = ANY(%s) AND kind = 'execute'",
            (step_ids,),
        ):
            received[step_id] = at
        for message_id, sent in await _rows(
            url,
            "SELECT message_id, sent_at FROM sagaplane_outbox WHERE correlation_id = ANY(%s)",
            (ids,),
        ):
            if message_id.endswith(":execute:1:reply"):
                replied[message_id.split(":", 1)[0]] = sent

    legs: dict[str, list[float]] = {k: [] for k in LEGS}
    for saga_id, at in created.items():
        legs["start"].append(at.timestamp() - due[saga_id])
    for saga_id, step_id, step_name, cmd_created, cmd_sent in commands:
        got, sent, done = (
            received.get(step_id),
            replied.get(step_id),
            applied.get((saga_id, step_name)),
        )
        if cmd_sent is None or got is None or sent is None or done is None:
            continue
        legs["dispatch"].append((cmd_sent - cmd_created).total_seconds())
        legs["deliver"].append((got - cmd_sent).total_seconds())
        legs["handle"].append((sent - got).total_seconds())
        legs["reply"].append((done - sent).total_seconds())
    return {
        "steps": len(legs["dispatch"]),
        "legs": {k: {"meaning": LEGS[k], **summary_ms(v)} for k, v in legs.items()},
    }
