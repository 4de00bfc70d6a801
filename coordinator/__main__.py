"""``python -m coordinator``: run the coordinator until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from coordinator.app import serve
from coordinator.config import parse


async def _main() -> bool:
    settings = parse()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(settings, stop)


def main() -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not asyncio.run(_main()):
        sys.exit(1)


if __name__ == "__main__":
    main()
