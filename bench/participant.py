"""The participants of the standard workload: ``python -m bench.participant SERVICE``.

Each handler does exactly ONE small INSERT on ``ctx.tx`` (the SDK's local transaction),
so what is measured is the SDK and the coordinator, not business logic. A step whose
input says ``"fail": true`` fails non-retryably before writing (to exercise
compensation when the harness asks for failures).

With ``$SAGAPLANE_BENCH_EMIT_EVENTS`` set to 1 (the ``events`` phase), every step handler
also emits one domain event (``ctx.emit``, ``bench.<action>``), in the same transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any

import psycopg

from sagaplane import NonRetryableError, Participant, StepContext
from sagaplane.runtime import EVENT_LOOPS, run

ACTIONS: dict[str, tuple[str, str]] = {
    "orders": ("orders.create", "orders.cancel"),
    "inventory": ("inventory.reserve", "inventory.release"),
    "payment": ("payment.charge", "payment.refund"),
}
"""Each service's step action and its compensation action."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_effects (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id text        NOT NULL,
    action  text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
)
"""

_INSERT = "INSERT INTO bench_effects (saga_id, action) VALUES (%s, %s)"

EMIT_EVENTS_ENV = "SAGAPLANE_BENCH_EMIT_EVENTS"
"""Set to 1: each step handler emits one domain event (see the module docstring)."""


def build(
    service: str, *, amqp_url: str, database_url: str, prefetch: int, pool_size: int
) -> Participant:
    """The participant of ``service``, with its step and compensation handlers."""
    action, undo = ACTIONS[service]
    emit_events = os.environ.get(EMIT_EVENTS_ENV) == "1"
    p = Participant(
        service,
        amqp_url=amqp_url,
        database_url=database_url,
        prefetch=prefetch,
        pool_size=pool_size,
        shutdown_timeout=5.0,
    )

    @p.step(action)
    async def run(ctx: StepContext) -> dict[str, Any]:
        if ctx.input.get("fail"):
            raise NonRetryableError("the benchmark asked this step to fail")
        await ctx.tx.execute(_INSERT, (ctx.saga_id, ctx.action))
        if emit_events:
            await ctx.emit(f"bench.{ctx.action}", {"saga_id": ctx.saga_id}, subject=ctx.step_id)
        return {"ok": True}

    @p.compensation(undo)
    async def compensate(ctx: StepContext) -> None:
        await ctx.tx.execute(_INSERT, (ctx.saga_id, ctx.action))

    return p


async def _main(args: argparse.Namespace) -> None:
    async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as c:
        await c.execute(SCHEMA)
    participant = build(
        args.service,
        amqp_url=args.amqp_url,
        database_url=args.database_url,
        prefetch=args.prefetch,
        pool_size=args.pool_size,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with participant:  # consuming from here on: the harness waits for that
        await stop.wait()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.participant")
    parser.add_argument("service", choices=sorted(ACTIONS))
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--database-url", required=True, help="the service's own database")
    parser.add_argument("--prefetch", type=int, default=32, help="SDK default: 32")
    parser.add_argument("--pool-size", type=int, default=10, help="SDK default: 10")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="uvloop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run(_main(args), event_loop=args.event_loop)


if __name__ == "__main__":
    main()
