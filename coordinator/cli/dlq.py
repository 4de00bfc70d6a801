"""``sagaplane dlq``: the dead-letter queue, ``sagaplane.dead-letter``, for people.

``list`` shows what each dead message is (a command, a reply or an event), why it died
and where it came from, and puts them all back; ``replay`` publishes the messages with
the given ids back to the queue they died in (through the default exchange, so that an
event goes to the one service whose handler failed, not to every subscriber again),
then removes them from the dead-letter queue. Replaying is safe where the consumer
deduplicates (a participant's inbox, an SDK consumer's event inbox): a message that was
handled after all is not handled twice.

Listing is not free of effects, and cannot be: a quorum queue has no way to show a
message without delivering it. ``list`` takes each message (``basic.get``) and gives it
back with ``basic.nack(requeue=True)`` (never ``basic.reject``), all of them even when it
fails half way. What a return costs depends on the broker (``x-delivery-count`` is shown
as each message's delivery count, so the cost can be seen):

- RabbitMQ 3.10 to 3.13: each listing adds one to every listed message's delivery count
  (checked on 3.10.8: nack, reject and a closed channel each add one). The dead-letter
  queue has no delivery limit (:func:`sagaplane.topology.dead_letter_queue_arguments`),
  so nothing is ever dropped.
- RabbitMQ 4.0 to 4.2: the same count, and quorum queues get a default delivery limit
  of 20, past which a message of the dead-letter queue (it has no dead-letter exchange)
  is dropped: listing it 20 times loses it. ``list`` warns on these brokers; lift the
  limit with the policy the README gives (Operations: dead letters).
- RabbitMQ 4.3 and later: ``basic.nack`` returns count only in ``x-acquired-count``,
  not toward the delivery limit; only a listing killed before it gave the messages back
  (its connection lost) counts one, as a failed delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPConnectionError, ChannelNotFoundEntity

from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from coordinator.config import shown
from sagaplane import defaults, topology, wire
from sagaplane.consuming import QUEUE_HEADER, REASON_HEADER, ROUTING_KEY_HEADER
from sagaplane.topology import DEAD_LETTER_QUEUE, EVENT_CONTENT_TYPE
from sagaplane.urls import redact

# Brokers on which every return of a message counts toward a delivery limit that quorum
# queues have by default (20): RabbitMQ 4.0 up to, not including, 4.3.
_RETURNS_COUNTED = ((4, 0), (4, 3))

LIST_EPILOG = """\
Listing takes each message and gives it back (basic.get, then basic.nack with requeue):
a quorum queue cannot show a message without delivering it. DELIVERY COUNT is the
broker's x-delivery-count. RabbitMQ 3.x adds one to it per listing, and the dead-letter
queue has no delivery limit there: nothing is dropped. RabbitMQ 4.0 to 4.2 add one too,
and drop a dead-letter message past their default limit of 20: `list` warns there; lift
the limit with a policy (README, Operations). RabbitMQ 4.3 and later do not count a
listing toward the limit.
"""

__all__ = ["add_dlq", "describe", "listing_counts_toward_the_limit"]


def add_dlq(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The ``dlq`` subcommands."""
    actions = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    def action(name: str, summary: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=summary, description=summary)
        sub.add_argument(
            "--amqp-url",
            default=env.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL),
            help=f"RabbitMQ URL [SAGAPLANE_AMQP_URL; default {shown(defaults.AMQP_URL)}]",
        )
        sub.add_argument("--json", action="store_true", help="print JSON (for scripts)")
        sub.add_argument(
            "--limit",
            type=int,
            default=1000,
            help="look at most at this many messages (default %(default)s)",
        )
        return sub

    listing = action("list", "What each dead message is, why it died, where it came from.")
    listing.epilog = LIST_EPILOG
    listing.formatter_class = argparse.RawDescriptionHelpFormatter
    listing.set_defaults(run=_list)
    replay = action("replay", "Publish dead messages back to the queue they came from.")
    replay.add_argument("ids", metavar="MESSAGE_ID", nargs="+", help="AMQP message ids")
    replay.set_defaults(run=_replay)


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead message for people: its id, kind, reason, origin queue and routing key, and
    the broker's counts of its deliveries (None where the broker keeps none)."""
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = headers.get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else None
    death: Mapping[str, Any] = first if isinstance(first, Mapping) else {}
    if message.type == wire.COMMAND_TYPE:
        kind = "command"
    elif message.type == wire.REPLY_TYPE:
        kind = "reply"
    elif (message.content_type or "").startswith(EVENT_CONTENT_TYPE) or any(
        str(k).startswith("ce-") for k in headers
    ):
        kind = "event"
    else:
        kind = "unknown"
    reason = headers.get(REASON_HEADER) or (
        f"dead-lettered by the broker: {_text(death.get('reason'))}" if death else "unknown"
    )
    keys = death.get("routing-keys")
    routing_key = headers.get(ROUTING_KEY_HEADER) or (
        _text(keys[0]) if isinstance(keys, list) and keys else message.routing_key
    )
    return {
        "message_id": message.message_id,
        "kind": kind,
        "type": message.type,
        "reason": _text(reason),
        "queue": _text(headers.get(QUEUE_HEADER) or death.get("queue") or ""),
        "routing_key": _text(routing_key or ""),
        # Returns to the dead-letter queue so far (the delivery limit is weighed against it).
        "delivery_count": _count(headers.get("x-delivery-count")),
        # Every time it was handed out (RabbitMQ 4.3 and later only).
        "acquired_count": _count(headers.get("x-acquired-count")),
    }


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _list(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, replay=set()))


def _replay(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args, replay=set(args.ids)))


async def _run(args: argparse.Namespace, *, replay: set[str]) -> int:
    try:
        connection = await aio_pika.connect(args.amqp_url)
    except (AMQPConnectionError, OSError) as exc:
        raise CliError(
            f"cannot connect to RabbitMQ at {redact(args.amqp_url)}: {exc}", ExitCode.UNAVAILABLE
        ) from exc
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            queue = await channel.get_queue(DEAD_LETTER_QUEUE, ensure=True)
        except ChannelNotFoundEntity:
            raise CliError(
                f"there is no queue {DEAD_LETTER_QUEUE} here", ExitCode.NOT_FOUND
            ) from None
        version = await topology.broker_version(channel)
        if not replay and version is not None and listing_counts_toward_the_limit(version):
            _warn_returns_counted(version)
        taken: list[AbstractIncomingMessage] = []
        found: list[dict[str, Any]] = []
        replayed: set[str] = set()
        try:
            while len(taken) < args.limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
            for message in taken:
                info = describe(message)
                if message.message_id in replay and message.message_id not in replayed:
                    if not info["queue"]:
                        say(f"message {message.message_id}: where it came from is not known; kept")
                        await _give_back(message)
                        continue
                    await _publish_back(channel, message, info["queue"])
                    await message.ack()
                    replayed.add(str(message.message_id))
                    info["replayed_to"] = info["queue"]
                    found.append(info)
                else:
                    await _give_back(message)
                    if not replay:
                        found.append(info)
        finally:
            # Every message goes back explicitly, even after a failure: RabbitMQ 4.3 counts
            # one left to the closing connection as a failed delivery, not a nack.
            for message in taken:
                if not message.processed:
                    with contextlib.suppress(Exception):
                        await _give_back(message)
    finally:
        await connection.close()
    if args.json:
        for info in found:
            say(json.dumps(info))
    elif replay:
        for info in found:
            say(f"message {info['message_id']} ({info['kind']}): replayed to {info['queue']}")
    else:
        rows = [
            [
                str(i["message_id"]),
                i["kind"],
                i["queue"],
                i["routing_key"],
                "" if i["delivery_count"] is None else str(i["delivery_count"]),
                i["reason"][:200],
            ]
            for i in found
        ]
        headings = ["MESSAGE ID", "KIND", "FROM QUEUE", "ROUTING KEY", "DELIVERY COUNT", "REASON"]
        say(render.table(headings, rows))
        if len(taken) >= args.limit:
            print(f"(the first {len(taken)} only; raise --limit for more)", file=sys.stderr)
    missing = sorted(replay - replayed)
    for message_id in missing:
        say(f"message {message_id}: not in {DEAD_LETTER_QUEUE}")
    return ExitCode.OK if not missing else ExitCode.NOT_FOUND


async def _give_back(message: AbstractIncomingMessage) -> None:
    # nack, not reject: RabbitMQ 4.3 and later count a reject toward the delivery limit.
    await message.nack(requeue=True)


def listing_counts_toward_the_limit(version: tuple[int, int]) -> bool:
    """Whether a broker of ``version`` counts a listing's return of a message toward a
    delivery limit that its quorum queues have by default (RabbitMQ 4.0 to 4.2)."""
    low, high = _RETURNS_COUNTED
    return low <= version < high


def _warn_returns_counted(version: tuple[int, int]) -> None:
    print(
        f"sagaplane: warning: RabbitMQ {version[0]}.{version[1]} counts this listing as a "
        f"delivery of every message listed, and drops a message of {DEAD_LETTER_QUEUE} past "
        "its delivery limit (20 unless a policy says otherwise): see DELIVERY COUNT, and "
        "lift the limit with the policy in the README (Operations: dead letters)",
        file=sys.stderr,
    )


async def _publish_back(
    channel: aio_pika.abc.AbstractChannel, message: AbstractIncomingMessage, queue: str
) -> None:
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if not str(k).startswith(("sagaplane-", "x-"))
    }
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        message_id=message.message_id,
        type=message.type,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    # The default exchange routes by queue name: back to that queue only.
    await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
