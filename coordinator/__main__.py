"""``python -m coordinator``: run the coordinator until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from coordinator.app import serve
from coordinator.config import Settings, parse
from sagaplane.runtime import run


async def _main(settings: Settings) -> bool:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings, stop)


def main() -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = parse()
    if not run(_main(settings), event_loop=settings.event_loop):
        sys.exit(1)


if __name__ == "__main__":
    main()
