"""``python -m examples.shop SERVICE``: run one demo participant until SIGTERM;
``python -m examples.shop demo``: the whole demo (see :mod:`examples.shop.demo`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from examples.shop import demo
from examples.shop.services import BUILDERS, create_tables
from sagaplane import defaults, logs
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


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per service, and ``demo``."""
    parser = argparse.ArgumentParser(prog="python -m examples.shop")
    commands = parser.add_subparsers(dest="command", metavar="SERVICE|demo", required=True)
    for service in sorted(BUILDERS):
        sub = commands.add_parser(service, help=f"run the {service} participant until SIGTERM")
        sub.add_argument(
            "--amqp-url", default=os.environ.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL)
        )
        sub.add_argument("--database-url", required=True, help="the service's own database")
    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="the demo shop end to end: a coordinator and five participants as real "
            "processes, one saga that completes and one that is compensated",
            epilog=demo.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
        os.environ,
    )
    return parser


def main() -> None:
    """Entry point."""
    args = build_parser().parse_args()
    if args.command == "demo":
        sys.exit(demo.run(args))
    # Text, or JSON lines with SAGAPLANE_LOG_FORMAT=json (as Participant.main does).
    logs.configure(logging.INFO, os.environ.get("SAGAPLANE_LOG_FORMAT", "text"))
    run(_run(args.command, args.amqp_url, args.database_url))


if __name__ == "__main__":
    main()
