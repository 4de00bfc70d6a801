"""A participant program for tests that run participants as processes.

``python traced_participant.py SERVICE ACTION [HOLD_FILE]``: serves ``ACTION`` (and
its compensation ``ACTION.undo``) on the database and broker of SAGAPLANE_DATABASE_URL
and SAGAPLANE_AMQP_URL, with tracing and logs as the environment says (it is
``Participant.main``). With ``HOLD_FILE``, the handler waits until that file exists,
so that a test can do something (restart the coordinator) while the step is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from sagaplane import Participant, StepContext

log = logging.getLogger("traced_participant")


def main() -> None:
    service, action, *hold = sys.argv[1:]
    participant = Participant(service, relay_poll_interval=0.2)

    @participant.step(action)
    async def run(ctx: StepContext) -> dict[str, Any]:
        log.info("running %s", action)
        # Another process makes the file: no asyncio.Event reaches across, so it polls.
        while hold and not await asyncio.to_thread(os.path.exists, hold[0]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        # The handler's transaction: part of its span.
        await ctx.tx.execute(b"SELECT 1")
        return {"done": action}

    @participant.compensation(f"{action}.undo")
    async def undo(ctx: StepContext) -> None:
        log.info("undoing %s", action)

    participant.main(event_loop="asyncio")


if __name__ == "__main__":
    main()
