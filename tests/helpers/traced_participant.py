"""A participant program for tests that run participants as processes.

``python traced_participant.py SERVICE ACTION [--hold FILE] [--fail]``: serves
``ACTION`` (and its compensation ``ACTION.undo``) on the database and broker of
SAGAPLANE_DATABASE_URL and SAGAPLANE_AMQP_URL, with tracing and logs as the environment
says (it is ``Participant.main``). With ``--hold``, the action waits until that file
exists, so that a test can do something (restart the coordinator) while the step is
in flight; with ``--fail``, the action fails for good (the saga is compensated).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from sagaplane import NonRetryableError, Participant, StepContext

log = logging.getLogger("traced_participant")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service")
    parser.add_argument("action")
    parser.add_argument("--hold")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    participant = Participant(args.service, relay_poll_interval=0.2)

    @participant.step(args.action)
    async def run(ctx: StepContext) -> dict[str, Any]:
        log.info("running %s", args.action)
        # Another process makes the file: no asyncio.Event reaches across, so it polls.
        while args.hold and not await asyncio.to_thread(os.path.exists, args.hold):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # The handler's transaction: part of its span.
        await ctx.tx.execute(b"SELECT 1")
        if args.fail:
            raise NonRetryableError("declined", error_type="Declined")
        return {"done": args.action}

    @participant.compensation(f"{args.action}.undo")
    async def undo(ctx: StepContext) -> None:
        log.info("undoing %s", args.action)

    participant.main(event_loop="asyncio")


if __name__ == "__main__":
    main()
