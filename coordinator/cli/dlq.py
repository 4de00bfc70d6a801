"""``sagaplane dlq``: the dead-letter queue, ``sagaplane.dead-letter``, for people.

``list`` shows what each dead message is (a command, a reply or an event), why it died
and where it came from, and puts them all back; ``replay`` publishes the messages with
the given ids back to the queue they died in (through the default exchange, so that an
event goes to the one service whose handler failed, not to every subscriber again),
then removes them from the dead-letter queue. Replaying is safe where the consumer
deduplicates (a participant's inbox, an SDK consumer's event inbox): a message that was
handled after all is not handled twice.

The messages are read with ``basic.get`` and returned with a requeue: RabbitMQ 4 counts
that as a delivery of the dead-letter queue's messages (its quorum queues drop a message
after 20 by default), so do not list a large queue in a loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import AMQPConnectionError, ChannelNotFoundEntity

from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from coordinator.config import shown
from sagaplane import defaults, wire
from sagaplane.consuming import QUEUE_HEADER, REASON_HEADER, ROUTING_KEY_HEADER
from sagaplane.topology import DEAD_LETTER_QUEUE, EVENT_CONTENT_TYPE
from sagaplane.urls import redact

__all__ = ["add_dlq"]


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

    action("list", "What each dead message is, why it died, where it came from.").set_defaults(
        run=_list
    )
    replay = action("replay", "Publish dead messages back to the queue they came from.")
    replay.add_argument("ids", metavar="MESSAGE_ID", nargs="+", help="AMQP message ids")
    replay.set_defaults(run=_replay)


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """A dead message for people: its id, kind, reason, origin queue and routing key."""
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
    }


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
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < args.limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
        found: list[dict[str, Any]] = []
        replayed: set[str] = set()
        for message in taken:
            info = describe(message)
            if message.message_id in replay and message.message_id not in replayed:
                if not info["queue"]:
                    say(f"message {message.message_id}: where it came from is not known; kept")
                    await message.nack(requeue=True)
                    continue
                await _publish_back(channel, message, info["queue"])
                await message.ack()
                replayed.add(str(message.message_id))
                info["replayed_to"] = info["queue"]
                found.append(info)
            else:
                await message.nack(requeue=True)
                if not replay:
                    found.append(info)
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
            [str(i["message_id"]), i["kind"], i["queue"], i["routing_key"], i["reason"][:200]]
            for i in found
        ]
        say(render.table(["MESSAGE ID", "KIND", "FROM QUEUE", "ROUTING KEY", "REASON"], rows))
    missing = sorted(replay - replayed)
    for message_id in missing:
        say(f"message {message_id}: not in {DEAD_LETTER_QUEUE}")
    return ExitCode.OK if not missing else ExitCode.NOT_FOUND


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
