"""``python -m examples.users SERVICE``: run the users or the partner participant until
SIGTERM; ``python -m examples.users demo``: everything, end to end (see
:mod:`examples.users.demo`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from examples.users import demo
from examples.users.service import BUILDERS, create_tables, seed_users
from sagaplane import defaults
from sagaplane.runtime import run


async def _run(service: str, amqp_url: str, database_url: str, seed: int) -> None:
    await create_tables(service, database_url)
    if seed:
        await seed_users(database_url, seed)
    logging.getLogger(__name__).info("%s participant starting", service)
    # Until SIGTERM; Ctrl-C cancels it. Either way it stops gracefully.
    await BUILDERS[service](amqp_url, database_url).run()


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per service, and ``demo``."""
    parser = argparse.ArgumentParser(prog="python -m examples.users")
    commands = parser.add_subparsers(dest="command", metavar="SERVICE|demo", required=True)
    for service in sorted(BUILDERS):
        sub = commands.add_parser(service, help=f"run the {service} participant until SIGTERM")
        sub.add_argument(
            "--amqp-url", default=os.environ.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL)
        )
        sub.add_argument("--database-url", required=True, help="the service's own database")
        if service == "users":
            sub.add_argument(
                "--seed", type=int, default=0, metavar="N", help="first add N users (user-1...)"
            )
    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="the example end to end in one process: a coordinator, both participants, "
            "a created user, a locked one, imports",
            description=demo.__doc__,
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run(_run(args.command, args.amqp_url, args.database_url, getattr(args, "seed", 0)))
    except KeyboardInterrupt:  # Ctrl-C: stopped gracefully already
        sys.exit(130)


if __name__ == "__main__":
    main()
