"""The test RabbitMQ: administered with rabbitmqctl, one fresh vhost per use."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika

from helpers.database import unique_name
from sagaplane import topology
from sagaplane.testing import create_vhost, delete_vhost, rabbitmqctl

__all__ = ["AMQP_HOST", "amqp_url_for", "commands_sink", "fresh_vhost", "rabbitmqctl"]

AMQP_HOST = os.environ.get("SAGAPLANE_TEST_AMQP_HOST", "127.0.0.1:5672")
"""Where the test broker listens (guest/guest)."""


def amqp_url_for(vhost: str) -> str:
    """The AMQP URL of ``vhost`` on the test broker, as guest."""
    return f"amqp://guest:guest@{AMQP_HOST}/{vhost}"


@asynccontextmanager
async def fresh_vhost() -> AsyncIterator[str]:
    """A new RabbitMQ vhost for guest, deleted afterwards; yields its AMQP URL."""
    vhost = unique_name("sagaplane_test")
    await create_vhost(vhost, "guest")
    try:
        yield amqp_url_for(vhost)
    finally:
        await delete_vhost(vhost)


@asynccontextmanager
async def commands_sink(amqp_url: str, pattern: str = "shop.#") -> AsyncIterator[None]:
    """A queue bound to the commands of ``pattern`` that keeps (almost) none of them:
    they are delivered, as to a participant that never answers, so the coordinator
    awaits their replies (a command that reached no queue is proven undelivered and
    its step not run) and no relay retries them."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await topology.declare_core(channel)  # before or after the coordinator does
        sink = await channel.declare_queue(
            exclusive=True, arguments={"x-max-length": 1, "x-overflow": "drop-head"}
        )
        await sink.bind(topology.COMMANDS_EXCHANGE, pattern)
        yield
