"""The server commands: ``serve`` (the coordinator), ``migrate`` and ``prune``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Mapping

import psycopg
from aiormq.exceptions import AMQPConnectionError, ChannelAccessRefused

from coordinator import config, retention
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from sagaplane import logs, tracing
from sagaplane.amqp import reply_text
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
    parser.add_argument(
        "--log-format",
        # argparse checks a flag against its choices, not a default from env: serve() does.
        default=env.get("SAGAPLANE_LOG_FORMAT", "text"),
        choices=logs.FORMATS,
        help="text for people, json for one JSON object per line "
        "[SAGAPLANE_LOG_FORMAT; default %(default)s]",
    )


def serve(args: argparse.Namespace) -> int:
    """Run the coordinator until SIGTERM or SIGINT; graceful shutdown, then exit."""
    if args.log_format not in logs.FORMATS:
        raise CliError(
            f"SAGAPLANE_LOG_FORMAT must be one of {', '.join(logs.FORMATS)}, "
            f"not {args.log_format!r}",
            ExitCode.USAGE,
        )
    try:
        settings = config.from_args(args)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    logs.configure(args.log_level, args.log_format)
    try:
        tracing.configure("sagaplane-coordinator")
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from exc
    try:
        return run(_serve(settings), event_loop=settings.event_loop)
    finally:
        # The spans still buffered are exported before the process ends.
        tracing.shutdown()


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
    except ChannelAccessRefused as exc:
        raise CliError(
            f"RabbitMQ at {redact(settings.amqp_url)} refused the coordinator's user: "
            f"{reply_text(exc)}; it needs the permissions that `sagaplane "
            "rabbitmq-permissions` prints for --coordinator-user",
            ExitCode.USAGE,
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


def add_prune(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """``prune`` takes the database and the retention rules, as ``serve`` does."""
    config.add_database_url(parser, env)
    retention.add_arguments(parser, env)
    parser.add_argument("--dry-run", action="store_true", help="only say what a pass would delete")


def prune(args: argparse.Namespace) -> int:
    """One retention pass (what a coordinator does every --prune-interval), or with
    --dry-run what it would delete."""
    rules = retention.from_args(args)
    return asyncio.run(_prune(args.database_url, rules, dry_run=args.dry_run))


async def _prune(database_url: str, rules: retention.Retention, *, dry_run: bool) -> int:
    from psycopg_pool import PoolTimeout

    from coordinator.errors import StorageUnavailable
    from coordinator.messaging.codec import encode_command
    from coordinator.store.pool import open_pool
    from coordinator.store.repository import SagaStore

    where = redact(database_url)
    try:
        pool = await open_pool(database_url, size=2)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise CliError(
            f"cannot use PostgreSQL at {where}: {_first_line(exc)}", ExitCode.UNAVAILABLE
        ) from exc
    try:
        pruner = retention.Pruner(SagaStore(pool, encode_command), pool, rules)
        say(f"{where}: {retention.describe(rules)}")
        if dry_run:
            expired, outbox = await pruner.dry_run()
            for e in expired:
                say(
                    f"would delete {e.sagas} {e.name} sagas (ended {e.oldest:%Y-%m-%d %H:%M} "
                    f"or later), {e.steps} steps, {e.history} history entries"
                )
            total = sum(e.sagas for e in expired)
            say(f"would delete {total} sagas and {outbox} sent outbox rows in all")
        else:
            done = await pruner.run_pass()
            say(
                f"deleted {done.sagas} sagas ({done.steps} steps, {done.history} history "
                f"entries) and {done.outbox} sent outbox rows"
            )
    except StorageUnavailable as exc:
        raise CliError(f"lost PostgreSQL at {where}: {exc}", ExitCode.UNAVAILABLE) from exc
    except (psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedTable) as exc:
        raise CliError(
            f"{where} is not up to date ({_first_line(exc)}): run `sagaplane migrate` first",
            ExitCode.UNAVAILABLE,
        ) from exc
    finally:
        await pool.close()
    return ExitCode.OK


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
