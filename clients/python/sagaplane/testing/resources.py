"""PostgreSQL databases and RabbitMQ vhosts of one's own, and URLs that point at them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import psycopg
from aiormq.exceptions import AMQPConnectionError, AMQPError, ProbableAuthenticationError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from sagaplane.amqp import with_vhost
from sagaplane.rabbitmqctl import RabbitmqctlFailed, rabbitmqctl

__all__ = [
    "RabbitmqctlFailed",
    "create_database",
    "create_vhost",
    "database_name",
    "delete_vhost",
    "drop_database",
    "has_consumer",
    "rabbitmqctl",
    "wait_for_consumers",
    "with_database",
    "with_vhost",
]


# -- PostgreSQL ---------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    """The same server and user, database ``name`` (a URL stays a URL; a key/value
    connection string stays one)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        return urlunsplit(parts._replace(path="/" + quote(name)))
    return make_conninfo(url, dbname=name)


def database_name(url: str) -> str:
    """The database a libpq URL or key/value string names; ValueError if none."""
    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise ValueError("the connection string names no database")
    return str(name)


async def _admin(url: str) -> psycopg.AsyncConnection[object]:
    # The server's own database, to create and drop others on it.
    return await psycopg.AsyncConnection.connect(with_database(url, "postgres"), autocommit=True)


async def create_database(
    url: str, *, template: str | None = None, exist_ok: bool = False, replace: bool = False
) -> bool:
    """CREATE the database ``url`` names (as a copy of ``template``, if given).

    Returns False if it existed and ``exist_ok``; with ``replace`` an existing one is
    dropped first; otherwise an existing one raises ``psycopg.errors.DuplicateDatabase``.
    """
    name = database_name(url)
    async with await _admin(url) as conn:
        if replace:
            await conn.execute(_drop(name))
        elif exist_ok:
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if await cur.fetchone() is not None:
                return False
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
        await conn.execute(create)
    return True


async def drop_database(url: str) -> None:
    """DROP the database ``url`` names if it exists, disconnecting whoever is left."""
    async with await _admin(url) as conn:
        await conn.execute(_drop(database_name(url)))


def _drop(name: str) -> sql.Composed:
    return sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))


# -- RabbitMQ -------------------------------------------------------------------------------


async def create_vhost(vhost: str, user: str = "guest") -> None:
    """A new vhost that ``user`` may use entirely (none is left if this fails)."""
    await rabbitmqctl("add_vhost", vhost)
    try:
        await rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except BaseException:
        with contextlib.suppress(RabbitmqctlFailed):
            await rabbitmqctl("delete_vhost", vhost)
        raise


async def delete_vhost(vhost: str) -> None:
    """Delete a vhost, with its queues and messages."""
    await rabbitmqctl("delete_vhost", vhost)


async def has_consumer(connection: aio_pika.abc.AbstractConnection, queue: str) -> bool:
    """Whether ``queue`` exists and has at least one consumer."""
    # A passive declare of a queue that does not exist yet closes the channel: one each time.
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return bool(declared.declaration_result.consumer_count)
    except AMQPError:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def wait_for_consumers(
    amqp_url: str,
    queues: Iterable[str],
    *,
    alive: Callable[[], None] | None = None,
    poll: float = 0.1,
) -> None:
    """Until every queue has a consumer (bound it with ``asyncio.timeout``).

    A broker that refuses connections is waited for too (it may be starting); a
    refused login raises. ``alive`` is called before each look and may raise.
    """
    waiting = list(queues)
    while True:
        if alive is not None:
            alive()
        try:
            connection = await aio_pika.connect(
                amqp_url, client_properties={"connection_name": "sagaplane-testing"}
            )
        except ProbableAuthenticationError:
            raise
        except AMQPConnectionError:
            await asyncio.sleep(max(poll, 0.5))
            continue
        try:
            while waiting:
                if alive is not None:
                    alive()
                waiting = [q for q in waiting if not await has_consumer(connection, q)]
                if waiting:
                    await asyncio.sleep(poll)
            return
        except (AMQPConnectionError, ConnectionError):
            await asyncio.sleep(max(poll, 0.5))  # the broker went away: connect again
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
