"""A service that emits a domain event, run as a real process by the event tests.

``python -m helpers.event_emitter emit TYPE ID``: a web-style transaction in the
service's own database (``$SAGAPLANE_DATABASE_URL``) writes a row of its own and emits
the event with :func:`sagaplane.events.emit`, commits, prints ``committed ID`` and then
waits, its relay not yet running (the state a SIGKILL right after the commit leaves).

``python -m helpers.event_emitter serve``: the same service as a participant (one step
handler), whose relay publishes what the outbox holds; prints ``serving`` once started.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import psycopg

from sagaplane import Participant, StepContext, events, migrations

SERVICE = "emitter"
SCHEMA = "CREATE TABLE IF NOT EXISTS emitter_orders (id text PRIMARY KEY)"


async def emit(database_url: str, type: str, event_id: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await migrations.apply(conn, migrations.outbox_migrations())
        await conn.execute(SCHEMA)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("INSERT INTO emitter_orders (id) VALUES (%s)", (event_id,))
        await events.emit(conn, type, {"order_id": event_id}, source=SERVICE, id=event_id)
        await conn.commit()
    print(f"committed {event_id}", flush=True)
    await asyncio.Event().wait()


def serve(database_url: str) -> None:
    participant = Participant(SERVICE, database_url=database_url, relay_poll_interval=0.2)

    @participant.step(f"{SERVICE}.noop")
    async def noop(ctx: StepContext) -> dict[str, Any]:
        return {}

    async def run() -> None:
        await participant.start()
        print("serving", flush=True)
        await participant.run()

    asyncio.run(run())


if __name__ == "__main__":
    url = os.environ["SAGAPLANE_DATABASE_URL"]
    if sys.argv[1] == "emit":
        asyncio.run(emit(url, sys.argv[2], sys.argv[3]))
    else:
        serve(url)
