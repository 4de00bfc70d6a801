"""``python -m examples.shop SERVICE``: run one demo participant until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from examples.shop.services import BUILDERS, create_tables
from sagaplane import defaults
from sagaplane.runtime import run


async def _run(service: str, amqp_url: str, database_url: str) -> None:
    await create_tables(service, database_url)
    participant = BUILDERS[service](amqp_url, database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with participant:
        logging.getLogger(__name__).info("%s participant running", service)
        await stop.wait()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m examples.shop")
    parser.add_argument("service", choices=sorted(BUILDERS))
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL),
    )
    parser.add_argument("--database-url", required=True, help="the service's own database")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run(_run(args.service, args.amqp_url, args.database_url))


if __name__ == "__main__":
    main()
