"""The server commands: ``serve`` (the coordinator) and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Mapping

import psycopg
from aiormq.exceptions import AMQPConnectionError

from coordinator import config
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from sagaplane.errors import BrokerUnavailable
from sagaplane.runtime import run
from sagaplane.topology import UnsupportedBrokerError
from sagaplane.urls import redact


def add_serve(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """``serve`` takes every coordinator setting (``python -m coordinator`` runs ``serve``)."""
    config.add_arguments(parser, env)
    _log_level(parser, env)


def add_migrate(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """``migrate`` needs only the database."""
    config.add_database_url(parser, env)


def _log_level(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    parser.add_argument(
        "--log-level",
        default=env.get("SAGAPLANE_LOG_LEVEL", "INFO").upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity [SAGAPLANE_LOG_LEVEL; default %(default)s]",
    )


def serve(args: argparse.Namespace) -> int:
    """Run the coordinator until SIGTERM or SIGINT; graceful shutdown, then exit."""
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = config.from_args(args)
    return run(_serve(settings), event_loop=settings.event_loop)


async def _serve(settings: config.Settings) -> int:
    from coordinator.api.server import ListenError
    from coordinator.app import serve as run_coordinator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        healthy = await run_coordinator(settings, stop)
    except psycopg.OperationalError as exc:
        raise CliError(
            f"cannot use PostgreSQL at {redact(settings.database_url)}: {_first_line(exc)}",
            ExitCode.UNAVAILABLE,
        ) from exc
    except BrokerUnavailable as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from exc
    except UnsupportedBrokerError as exc:
        raise CliError(
            f"cannot use RabbitMQ at {redact(settings.amqp_url)}: {exc}", ExitCode.UNAVAILABLE
        ) from exc
    except AMQPConnectionError as exc:
        raise CliError(
            f"cannot use RabbitMQ at {redact(settings.amqp_url)}: {_first_line(exc)}",
            ExitCode.UNAVAILABLE,
        ) from exc
    except config.ConfigError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from exc
    except ListenError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from exc
    except OSError as exc:
        raise CliError(f"cannot start: {_first_line(exc)}", ExitCode.UNAVAILABLE) from exc
    return ExitCode.OK if healthy else ExitCode.ERROR


def migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations to the coordinator's database and say which."""
    return asyncio.run(_migrate(args.database_url))


async def _migrate(database_url: str) -> int:
    from coordinator.store.migrate import migrate as apply_migrations

    try:
        applied = await apply_migrations(database_url)
    except psycopg.OperationalError as exc:
        raise CliError(
            f"cannot use PostgreSQL at {redact(database_url)}: {_first_line(exc)}",
            ExitCode.UNAVAILABLE,
        ) from exc
    where = redact(database_url)
    if not applied:
        say(f"{where}: up to date, nothing to apply")
    for m in applied:
        say(f"{where}: applied {m.component}/{m.version:04d}_{m.name}")
    return ExitCode.OK


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
