"""``sagaplane outbox``: an outbox's rows by status, and what a person does about them;
``sagaplane relay``: the outbox relay on its own.

Both work on any database with Sagaplane's outbox: the coordinator's, or a participant
service's own (``--database-url``). ``stats`` counts the rows per status, says how long
the oldest unpublished row has waited and what the latest failure of the ``failed`` rows
was (a broker refusing them, or one that cannot be reached); ``list`` shows the rows that
may need a person (``failed``, ``invalid``, ``expired``) with their last error; ``retry``
puts rows back to ``pending`` for the relay; ``discard`` deletes rows that must never be
published. ``relay`` publishes a database's outbox until SIGTERM, for a service that
emits events but runs no participant (its web process writes, this worker publishes),
with the relay settings ``sagaplane serve`` takes too
(:func:`coordinator.config.add_relay_arguments`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from coordinator import config
from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from sagaplane import defaults, outbox
from sagaplane.relay import OutboxRelay
from sagaplane.relay_settings import RelaySettings
from sagaplane.runtime import run
from sagaplane.urls import redact

__all__ = ["add_outbox", "add_relay"]


def add_outbox(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The ``outbox`` subcommands."""
    actions = parser.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=summary, description=summary)
        config.add_database_url(sub, env)
        sub.add_argument("--json", action="store_true", help="print JSON (for scripts)")
        return sub

    action("stats", "Rows per status, and the age of the oldest unpublished one.").set_defaults(
        run=_stats
    )
    listing = action("list", "The rows that may need a person, oldest first, with their error.")
    listing.add_argument(
        "--status",
        action="append",
        choices=outbox.STATUSES,
        help="only rows in this status (repeat for more; default failed, invalid, expired)",
    )
    listing.add_argument(
        "--limit", type=int, default=50, help="at most this many (default %(default)s)"
    )
    listing.set_defaults(run=_list)
    retry = action("retry", "Put rows back to pending: the relay publishes them next.")
    retry.add_argument("ids", metavar="ID", type=int, nargs="+", help="outbox row ids")
    retry.set_defaults(run=_retry)
    discard = action("discard", "Delete unpublished rows: they are never published.")
    discard.add_argument("ids", metavar="ID", type=int, nargs="+", help="outbox row ids")
    discard.set_defaults(run=_discard)


def add_relay(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The ``relay`` command's flags."""
    config.add_database_url(parser, env)
    parser.add_argument(
        "--amqp-url",
        default=env.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL),
        help=f"RabbitMQ URL [SAGAPLANE_AMQP_URL; default {config.shown(defaults.AMQP_URL)}]",
    )
    config.add_relay_arguments(parser, env)
    parser.set_defaults(run=_relay)


def _stats(args: argparse.Namespace) -> int:
    found = asyncio.run(_with_conn(args.database_url, outbox.stats))
    failed_at = found.last_failed_at.isoformat() if found.last_failed_at else None
    if args.json:
        say(
            json.dumps(
                {
                    "counts": found.counts,
                    "oldest_pending_s": found.oldest_pending_s,
                    "last_failed_at": failed_at,
                    "last_error": found.last_error,
                }
            )
        )
        return ExitCode.OK
    rows = [[status, str(count)] for status, count in found.counts.items()]
    say(render.table(["STATUS", "ROWS"], rows))
    if found.oldest_pending_s is not None:
        say(f"oldest unpublished row: waiting {found.oldest_pending_s:.1f}s")
    if found.last_error is not None:
        error = found.last_error.replace("\n", " ")[:500]
        say(f"last failure ({found.counts['failed']} failed, at {failed_at}): {error}")
    return ExitCode.OK


def _list(args: argparse.Namespace) -> int:
    statuses = args.status or list(outbox.PROBLEM_STATUSES)

    async def work(conn: psycopg.AsyncConnection[Any]) -> list[outbox.OutboxRow]:
        return await outbox.problems(conn, statuses, limit=args.limit)

    rows = asyncio.run(_with_conn(args.database_url, work))
    if args.json:
        for row in rows:
            say(
                json.dumps(
                    {
                        "id": row.id,
                        "status": row.status,
                        "message_id": row.message_id,
                        "exchange": row.exchange,
                        "routing_key": row.routing_key,
                        "message_type": row.message_type,
                        "attempts": row.attempts,
                        "created_at": row.created_at.isoformat(),
                        "failed_at": row.failed_at.isoformat() if row.failed_at else None,
                        "last_error": row.last_error,
                    }
                )
            )
        return ExitCode.OK
    say(
        render.table(
            ["ID", "STATUS", "ATTEMPTS", "EXCHANGE", "ROUTING KEY", "LAST ERROR"],
            [
                [
                    str(r.id),
                    r.status,
                    str(r.attempts),
                    r.exchange,
                    r.routing_key,
                    (r.last_error or "").replace("\n", " ")[:200],
                ]
                for r in rows
            ],
        )
    )
    return ExitCode.OK


def _retry(args: argparse.Namespace) -> int:
    return _change(args, outbox.retry, "back to pending")


def _discard(args: argparse.Namespace) -> int:
    return _change(args, outbox.discard, "discarded")


def _change(args: argparse.Namespace, change: Any, done: str) -> int:
    async def work(conn: psycopg.AsyncConnection[Any]) -> list[int]:
        async with conn.transaction():
            changed: list[int] = await change(conn, args.ids)
            return changed

    changed = asyncio.run(_with_conn(args.database_url, work))
    missing = sorted(set(args.ids) - set(changed))
    if args.json:
        say(json.dumps({"changed": changed, "not_found": missing}))
    else:
        for row_id in changed:
            say(f"outbox row {row_id}: {done}")
        for row_id in missing:
            say(f"outbox row {row_id}: no such unpublished row")
    return ExitCode.OK if not missing else ExitCode.NOT_FOUND


async def _with_conn(database_url: str, work: Any) -> Any:
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            return await work(conn)
    except psycopg.OperationalError as exc:
        raise CliError(
            f"cannot use PostgreSQL at {redact(database_url)}: {_first_line(exc)}",
            ExitCode.UNAVAILABLE,
        ) from exc
    except psycopg.errors.UndefinedColumn as exc:
        raise CliError(
            f"{redact(database_url)} has an outbox without status: apply the migrations "
            "first (sagaplane migrate, or start the participant)",
            ExitCode.UNAVAILABLE,
        ) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise CliError(f"{redact(database_url)} has no Sagaplane outbox", ExitCode.USAGE) from exc


def _relay(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = config.relay_from_args(args)
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    return int(run(_run_relay(args.database_url, args.amqp_url, settings)))


async def _run_relay(database_url: str, amqp_url: str, settings: RelaySettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, open=False, name="sagaplane-relay"
    )
    try:
        await pool.open(wait=True, timeout=30)
    except Exception as exc:
        raise CliError(
            f"cannot use PostgreSQL at {redact(database_url)}: {_first_line(exc)}",
            ExitCode.UNAVAILABLE,
        ) from exc
    try:
        relay = OutboxRelay.from_settings(
            pool, amqp_url, settings, connection_name="sagaplane-relay"
        )
        async with relay:
            logging.getLogger(__name__).info("relaying the outbox of %s", redact(database_url))
            await stop.wait()
    finally:
        await pool.close()
    return ExitCode.OK


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
