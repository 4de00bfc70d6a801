"""Participants: step and compensation handlers, run once per step, answered through the outbox.

A :class:`Participant` consumes its service's queue (``sagaplane.participant.<service>``,
bound to every registered action) and handles each command in ONE local transaction
(claim the inbox row, run the handler, store the outcome, write the reply to the
outbox; see :mod:`sagaplane.inbox`), then acks the AMQP message. So the handler's writes,
"this step was handled" and "its reply will be sent" commit together or not at all, and
a redelivered or retried command is answered from the inbox with the stored outcome.
The replies are published by the SDK's :class:`~sagaplane.relay.OutboxRelay`, running
inside the participant.

A message that is not a valid StepCommand, or names an action this service did not
register, is dead-lettered with its reason; a database outage holds the command and
retries it (see :mod:`sagaplane.command_consumer`). What the two ends of the wire agree
on is in :mod:`sagaplane.wire`.

Middleware (:mod:`sagaplane.middleware`) wraps the processing of each delivered
command: before the handler, after the commit, before the ack.

Domain events: handlers emit them with ``ctx.emit`` (:mod:`sagaplane.events`); a
participant consumes them with :meth:`Participant.on_event` handlers, from its events
queue ``sagaplane.events.<service>``, each event once in its database (see
:mod:`sagaplane.event_consumer`). A participant may have event handlers only.

This module is the public face: :class:`Participant` (registration and lifecycle), and
:class:`StepContext`, :data:`Handler`, :class:`StepKind` and the middleware types,
re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

import psycopg
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from sagaplane import (
    amqp,
    deadlines,
    defaults,
    logs,
    migrations,
    retention,
    runtime,
    signing,
    topology,
    tracing,
)
from sagaplane.command_consumer import CommandConsumer
from sagaplane.consuming import DeadLetters
from sagaplane.errors import BrokerUnavailable, ConfigurationError, DatabaseUnavailable
from sagaplane.event_consumer import EventConsumer
from sagaplane.events import EventContext, EventHandler
from sagaplane.handler import Handler, StepContext
from sagaplane.inbox import Inbox
from sagaplane.metrics import (
    DeadLetterCollector,
    MetricsServer,
    OutboxGauges,
    ParticipantMetrics,
    new_registry,
    parse_listen,
)
from sagaplane.middleware import CallNext, Delivery, Middleware, Processed
from sagaplane.relay import OutboxRelay
from sagaplane.relay_settings import RelaySettings
from sagaplane.urls import redact
from sagaplane.wire import StepKind

__all__ = [
    "CallNext",
    "Delivery",
    "EventContext",
    "EventHandler",
    "Handler",
    "Middleware",
    "Participant",
    "Processed",
    "StepContext",
    "StepKind",
    "participant_migrations",
]

log = logging.getLogger(__name__)

H = TypeVar("H", bound=Handler)
E = TypeVar("E", bound=EventHandler)

METRICS_LISTEN_ENV = "SAGAPLANE_PARTICIPANT_METRICS_LISTEN"
"""The environment variable a Participant takes ``metrics_listen`` from."""

INBOX_RETENTION_ENV = "SAGAPLANE_INBOX_RETENTION"
"""The environment variable a Participant takes ``inbox_retention`` from."""

OUTBOX_RETENTION_ENV = "SAGAPLANE_OUTBOX_RETENTION"
"""The environment variable a Participant takes ``outbox_retention`` from (the
coordinator's ``--outbox-retention`` reads the same name)."""


def _window(
    name: str, value: str | timedelta | None, env: str, default: timedelta
) -> timedelta | None:
    """A retention window from the argument, else the environment, else the default."""
    if value is None:
        value = os.environ.get(env) or default
    try:
        return retention.parse_retention(value)
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


async def _prune_inbox(
    pool: AsyncConnectionPool[AsyncConnection[Any]], keep: timedelta, limit: int
) -> int:
    return await retention.prune_inbox(pool, keep=keep, limit=limit)


async def _prune_outbox(
    pool: AsyncConnectionPool[AsyncConnection[Any]], keep: timedelta, limit: int
) -> int:
    return await retention.prune_outbox(pool, keep=keep, limit=limit)


def _signing_keys(keys: str | Sequence[str] | None) -> tuple[bytes, ...] | None:
    """The keys from the argument, else ``$SAGAPLANE_SIGNING_KEY``; None: unsigned."""
    if keys is None:
        keys = os.environ.get(signing.KEYS_ENV) or None
    if keys is None:
        return None
    try:
        return signing.parse_keys(keys)
    except signing.InvalidKeys as exc:
        raise ConfigurationError(f"signing_keys: {exc}") from None


def participant_migrations() -> list[migrations.Migration]:
    """What a participant's database needs: the outbox, then the inbox."""
    return migrations.outbox_migrations() + migrations.load(
        "sagaplane", "sql/participant", "participant"
    )


class Participant:
    """A service that executes saga steps.

    Register handlers with :meth:`step` and :meth:`compensation`, then call
    :meth:`main` from a program (it logs, serves until SIGTERM or Ctrl-C, and exits
    with one line and status 3 when PostgreSQL or RabbitMQ cannot be reached), or
    ``await run()``, or use ``async with participant:`` / :meth:`start` / :meth:`stop`.

    ``amqp_url`` defaults to ``$SAGAPLANE_AMQP_URL`` (else the local broker's guest
    account, as the coordinator's), ``database_url`` (the service's own database) to
    ``$SAGAPLANE_DATABASE_URL``. A user of the service's own (``sagaplane
    rabbitmq-permissions``) may not declare the coordinator's exchanges and queues, only
    check them: :meth:`start` raises :class:`~sagaplane.errors.TopologyMissing` while
    they do not exist, and a ConfigurationError quoting the broker when the user lacks a
    permission that the service needs. ``schema`` is SQL for the service's own tables, run at
    :meth:`start` after the SDK's migrations, in one transaction: write it so that it
    can run again (``CREATE TABLE IF NOT EXISTS``). It suits a small service or an
    example; a service with a migration tool of its own runs that instead.

    ``prefetch`` bounds the commands handled at once; each holds one of ``pool_size``
    database connections while it runs (the outbox relay borrows one per cycle).
    ``shutdown_timeout`` is how long :meth:`stop` lets in-flight handlers finish before
    cancelling them (their commands are then redelivered, and the inbox answers any
    that did commit). With ``migrate`` (the default), :meth:`start` applies the outbox
    and inbox migrations first.

    ``reply_exchange`` is where replies are published (routing key
    :data:`~sagaplane.topology.REPLIES_ROUTING_KEY`); leave it at
    :data:`~sagaplane.topology.REPLIES_EXCHANGE`, the coordinator's. It is a hook for a
    proxy (or a fault-injection test) that sits between participants and the
    coordinator and forwards replies itself; that exchange must exist (and have a queue
    bound for the routing key) before replies are published, or they count as failed
    publishes.

    Each command runs under its attempt's deadline (the step's timeout, see
    :mod:`sagaplane.deadlines`): the handler is cancelled shortly before it, its writes
    are rolled back and the reply is a retryable ``DeadlineExceeded`` failure
    (``deadline exceeded after 2.0s``); PostgreSQL ends the transaction at the deadline
    too. ``clock_tolerance`` (seconds) is how far a command's absolute deadline may lie
    beyond its whole timeout before this host's clock is taken to be behind the
    coordinator's and the timeout is counted from the command's arrival instead; None
    always counts from the arrival (for a host whose clock cannot be kept in sync).

    ``middleware`` wraps the processing of every delivered command, outermost first
    (see :mod:`sagaplane.middleware`)::

        async def timed(delivery: Delivery, call_next: CallNext) -> None:
            started = time.monotonic()  # before the handler
            processed = await call_next()  # claim, handler, outcome, reply, COMMIT
            log.info("%s: %s in %.3fs", delivery.action, processed, time.monotonic() - started)
            # returning lets the SDK ack (or dead-letter, or requeue) the message

    ``call_next()`` returns a :class:`~sagaplane.middleware.Processed`: whether the
    handler ran (``HANDLED``), the inbox re-sent a stored outcome (``REPLAYED``), an
    execute after its compensation was refused (``REFUSED``), the message is
    dead-lettered (``DEAD_LETTERED``: not a valid command; see
    ``delivery.refusal``) or requeued (``REQUEUED``: stopped during a database outage).
    The message is settled after the outermost middleware returns. An exception from a
    middleware or from ``call_next()`` is a processing failure: the message is
    requeued, and dead-lettered with the reason on its last delivery.

    ``metrics_listen`` (``host:port``, port 0 for a free one; default
    ``$SAGAPLANE_PARTICIPANT_METRICS_LISTEN``, a name of its own so that it never takes
    the coordinator's address on a shared host) serves Prometheus metrics at
    ``/metrics`` (see :mod:`sagaplane.metrics`); None or empty serves none and opens no
    port.

    The outbox relay's ``relay_poll_interval`` (seconds), ``relay_batch_size`` (rows per
    cycle), ``relay_max_attempts`` (publishes the broker refused before a row is parked;
    a broker outage counts none) and ``relay_max_age`` (seconds before an unpublished
    row expires) default to
    ``$SAGAPLANE_OUTBOX_POLL_INTERVAL`` (1.0), ``$SAGAPLANE_OUTBOX_BATCH_SIZE`` (500),
    ``$SAGAPLANE_OUTBOX_MAX_ATTEMPTS`` (20) and ``$SAGAPLANE_OUTBOX_MAX_AGE`` (never); see
    :class:`~sagaplane.relay_settings.RelaySettings`.

    Event handlers (:meth:`on_event`) that raise are retried with exponential backoff
    from ``event_retry_initial`` up to ``event_retry_max`` seconds, and the event is
    dead-lettered with the error once ``event_max_attempts`` runs have failed.
    Retention (:mod:`sagaplane.retention`): every ``prune_interval`` seconds, inbox rows
    first received longer than ``inbox_retention`` ago (default
    ``$SAGAPLANE_INBOX_RETENTION``, else 7 days) and outbox rows sent longer than
    ``outbox_retention`` ago (default ``$SAGAPLANE_OUTBOX_RETENTION``, else 24 hours)
    are deleted, in small batches that any number of instances can run at once. Each
    takes a duration (``7d``, ``24h``, a ``timedelta``) or ``"off"`` to keep every row.
    The inbox window must exceed the longest span over which a copy of a command can
    still come (a redelivery, a retry of a step whose reply was lost): a copy that comes
    later runs its handler again (README, "Retention").

    ``signing_keys`` (hex keys, a list or comma-separated; default
    ``$SAGAPLANE_SIGNING_KEY``) is the key this service shares with the coordinator
    (:mod:`sagaplane.signing`): with it, a command is run only if the coordinator signed
    it (anything else is dead-lettered, cause ``signature``) and every reply is signed.
    The first key signs, every key verifies (rotation). The coordinator signs an action
    with the key of the service named by the action's prefix (``payment.charge``: the
    service ``payment``), so register only actions named for this service.
    """

    def __init__(
        self,
        service: str,
        *,
        amqp_url: str | None = None,
        database_url: str | None = None,
        schema: str | Sequence[str] = (),
        prefetch: int = 32,
        pool_size: int = 10,
        migrate: bool = True,
        shutdown_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        relay_poll_interval: float | None = None,
        relay_batch_size: int | None = None,
        relay_max_attempts: int | None = None,
        relay_max_age: float | None = None,
        reply_exchange: str = topology.REPLIES_EXCHANGE,
        middleware: Sequence[Middleware] = (),
        clock_tolerance: float | None = deadlines.DEFAULT_CLOCK_TOLERANCE,
        metrics_listen: str | None = None,
        event_max_attempts: int = 5,
        event_retry_initial: float = 0.5,
        event_retry_max: float = 30.0,
        inbox_retention: str | timedelta | None = None,
        outbox_retention: str | timedelta | None = None,
        prune_interval: float = retention.DEFAULT_INTERVAL,
        signing_keys: str | Sequence[str] | None = None,
    ) -> None:
        if not service:
            raise ConfigurationError("service must not be empty")
        if prefetch < 1 or pool_size < 1:
            raise ConfigurationError("prefetch and pool_size must be at least 1")
        if not reply_exchange:
            raise ConfigurationError("reply_exchange must not be empty")
        if event_max_attempts < 1:
            raise ConfigurationError("event_max_attempts must be at least 1")
        if not event_retry_initial >= 0 or not event_retry_max >= event_retry_initial:
            raise ConfigurationError(
                "event_retry_initial must be >= 0 and event_retry_max >= event_retry_initial"
            )
        if not all(callable(layer) for layer in middleware):
            raise ConfigurationError("every middleware must be a coroutine function")
        if clock_tolerance is not None and not clock_tolerance >= 0:
            raise ConfigurationError("clock_tolerance must be a number of seconds >= 0, or None")
        database_url = database_url or os.environ.get("SAGAPLANE_DATABASE_URL")
        if not database_url:
            raise ConfigurationError(
                "database_url is required (the service's own PostgreSQL database): pass "
                "it, or set SAGAPLANE_DATABASE_URL"
            )
        self._metrics_listen = metrics_listen or os.environ.get(METRICS_LISTEN_ENV) or None
        if self._metrics_listen is not None:
            try:
                parse_listen(self._metrics_listen)
            except ValueError as exc:
                raise ConfigurationError(f"metrics_listen: {exc}") from None
        self._metrics_server: MetricsServer | None = None
        self._inbox_retention = _window(
            "inbox_retention",
            inbox_retention,
            INBOX_RETENTION_ENV,
            retention.DEFAULT_INBOX_RETENTION,
        )
        self._outbox_retention = _window(
            "outbox_retention",
            outbox_retention,
            OUTBOX_RETENTION_ENV,
            retention.DEFAULT_OUTBOX_RETENTION,
        )
        if not prune_interval > 0:
            raise ConfigurationError("prune_interval must be a number of seconds > 0")
        self._prune_interval = prune_interval
        self._pruner: retention.PruneLoop | None = None
        self._clock_tolerance = clock_tolerance
        self._signing_keys = _signing_keys(signing_keys)
        self.service = service
        self._amqp_url = amqp_url or os.environ.get("SAGAPLANE_AMQP_URL") or defaults.AMQP_URL
        self._database_url = database_url
        self._schema = (schema,) if isinstance(schema, str) else tuple(schema)
        self._prefetch = prefetch
        self._pool_size = pool_size
        self._migrate = migrate
        self._shutdown_timeout = shutdown_timeout
        self._connect_timeout = connect_timeout
        try:
            from_env = RelaySettings.from_env(os.environ)
            self._relay_settings = RelaySettings(
                batch_size=relay_batch_size or from_env.batch_size,
                poll_interval=(
                    relay_poll_interval
                    if relay_poll_interval is not None
                    else from_env.poll_interval
                ),
                max_attempts=relay_max_attempts or from_env.max_attempts,
                max_age=relay_max_age or from_env.max_age,
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self._reply_exchange = reply_exchange
        self._middleware = tuple(middleware)
        self._name = f"sagaplane-participant-{service}"

        self._event_max_attempts = event_max_attempts
        self._event_retry_initial = event_retry_initial
        self._event_retry_max = event_retry_max
        self._handlers: dict[tuple[StepKind, str], Handler] = {}
        self._event_handlers: list[tuple[str, EventHandler]] = []
        self._events_queue: AbstractQueue | None = None
        self._events_tag: str | None = None
        self._event_dead_letters: DeadLetters | None = None
        self._event_consumer: EventConsumer | None = None
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._relay: OutboxRelay | None = None
        self._dead_letters: DeadLetters | None = None
        self._consumer: CommandConsumer | None = None
        self._stop_requested = asyncio.Event()
        self._started = False
        self._shutdown_task: asyncio.Task[None] | None = None

    # -- registration ---------------------------------------------------------------

    def step(self, action: str) -> Callable[[H], H]:
        """Register the decorated coroutine function as the handler of ``action``."""
        return self._register(StepKind.EXECUTE, action)

    def compensation(self, action: str) -> Callable[[H], H]:
        """Register the decorated coroutine function as the compensation ``action``.

        Compensations are retried until they succeed or fail non-retryably, so make them
        tolerate "nothing to undo" (``ctx.output`` may be empty).
        """
        return self._register(StepKind.COMPENSATE, action)

    def on_event(self, pattern: str) -> Callable[[E], E]:
        """Register the decorated coroutine function as a handler of the domain events
        whose type matches ``pattern``, an AMQP topic pattern (``order.created``,
        ``order.*``, ``payment.#``).

        The service's events queue is bound to the pattern at start. Each event runs
        every matching handler once (in registration order) in one transaction, with
        an inbox row keyed by its source and id; see :mod:`sagaplane.event_consumer`.
        """
        if not pattern or len(pattern.encode()) > 255:
            raise ConfigurationError("an event pattern must be 1 to 255 bytes")

        def decorator(handler: E) -> E:
            if self._started:
                raise ConfigurationError(f"register the event pattern {pattern!r} before start()")
            self._event_handlers.append((pattern, handler))
            return handler

        return decorator

    @property
    def event_patterns(self) -> list[str]:
        """Every registered event pattern (what the events queue is bound to)."""
        return list(dict.fromkeys(pattern for pattern, _ in self._event_handlers))

    @property
    def dead_lettered(self) -> Mapping[str, int]:
        """Commands and events this participant dead-lettered, by cause (``undecodable``,
        ``failed``, ``signature``; events' as ``event_undecodable`` and ``event_failed``);
        see :mod:`sagaplane.consuming`. A command for an action without a handler is not
        dead-lettered: it is answered with a non-retryable failure."""
        counts = dict(self._dead_letters.counts) if self._dead_letters is not None else {}
        if self._event_dead_letters is not None:
            counts.update({f"event_{k}": v for k, v in self._event_dead_letters.counts.items()})
        return counts

    @property
    def metrics_port(self) -> int | None:
        """The port of ``/metrics`` once started (useful with port 0); None without."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def actions(self) -> list[str]:
        """Every registered action (the routing keys the queue is bound to)."""
        return list(dict.fromkeys(action for _, action in self._handlers))

    def _register(self, kind: StepKind, action: str) -> Callable[[H], H]:
        if not action:
            raise ConfigurationError("action must not be empty")

        def decorator(handler: H) -> H:
            if self._started:
                # The queue's bindings are declared at start; a later handler would never
                # receive anything.
                raise ConfigurationError(f"register {action!r} before start()")
            if (kind, action) in self._handlers:
                raise ConfigurationError(f"{kind} handler for {action!r} registered twice")
            if self._signing_keys is not None and signing.owner(action) != self.service:
                log.warning(
                    "participant %s: the coordinator signs %r with the key of service %r, "
                    "not this one's; its commands will be dead-lettered here unless the "
                    "two share a key",
                    self.service,
                    action,
                    signing.owner(action),
                )
            self._handlers[(kind, action)] = handler
            return handler

        return decorator

    # -- lifecycle --------------------------------------------------------------------

    async def migrate(self) -> list[migrations.Migration]:
        """Apply the outbox and inbox migrations not applied yet; returns those applied."""
        # Reading the package's SQL files is file I/O: keep it off the event loop.
        wanted = await asyncio.to_thread(participant_migrations)
        async with await self._connect_database() as conn:
            applied = await migrations.apply(conn, wanted)
        for m in applied:
            log.info("applied migration %s/%04d_%s", m.component, m.version, m.name)
        return applied

    async def _connect_database(self) -> AsyncConnection[Any]:
        """An autocommit connection to the service's database; DatabaseUnavailable (one
        line, the URL without its password) if there is none to be had."""
        try:
            return await AsyncConnection.connect(
                self._database_url, autocommit=True, connect_timeout=int(self._connect_timeout)
            )
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            hint = ""
            if "does not exist" in reason and "database" in reason:
                hint = " (create it first, e.g. with createdb)"
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {redact(self._database_url)}: {reason}{hint}"
            ) from exc

    async def _create_schema(self) -> None:
        async with await self._connect_database() as conn, conn.transaction():
            for statement in self._schema:
                await conn.execute(statement.encode())

    async def start(self) -> None:
        """Migrate, connect, declare the queue, start the relay and consuming.

        Calling it twice does nothing; a stopped participant cannot be restarted. If
        anything fails, what was started is stopped and the error is raised.
        """
        if self._shutdown_task is not None:
            raise RuntimeError("a stopped Participant cannot be restarted")
        if self._started:
            return
        if not self._handlers and not self._event_handlers:
            raise ConfigurationError("register at least one step, compensation or event handler")
        try:
            # On when the OTEL_* / SAGAPLANE_TRACES_FILE environment asks (sagaplane.tracing).
            tracing.configure(self.service)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        self._started = True
        try:
            if self._migrate:
                await self.migrate()
            if self._schema:
                await self._create_schema()
            if not (self._migrate or self._schema):
                # The pool would only time out: say what is wrong at once.
                async with await self._connect_database():
                    pass
            self._pool = AsyncConnectionPool(
                self._database_url,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                open=False,
                name=self._name,
                # The SDK sends BEGIN itself, batched with the inbox claim (see Inbox.process).
                kwargs={"autocommit": True},
            )
            await self._pool.open(wait=True, timeout=self._connect_timeout)
            metrics = await self._serve_metrics(self._pool)
            self._connection = await amqp.connect(
                self._amqp_url, name=self._name, timeout=self._connect_timeout
            )
            # The relay shares the connection and opens its own (confirming) channel.
            self._relay = OutboxRelay.from_settings(
                self._pool, self._connection, self._relay_settings, connection_name=self._name
            )
            await self._relay.start()
            self._pruner = self._prune_loop(self._pool)
            await self._pruner.start()
            self._dead_letters = DeadLetters(
                self._connection, queue=topology.participant_queue(self.service)
            )
            self._channel = await self._connection.channel()
            await self._channel.set_qos(prefetch_count=self._prefetch)
            self._queue = await self._declare(self._connection, self._channel)
            self._consumer = CommandConsumer(
                service=self.service,
                handlers=self._handlers,
                inbox=Inbox(
                    self._pool,
                    service=self.service,
                    reply_exchange=self._reply_exchange,
                    metrics=metrics,
                    signing_keys=self._signing_keys,
                ),
                dead_letters=self._dead_letters,
                stopping=self._stop_requested,
                task_prefix=self._name,
                middleware=self._middleware,
                clock_tolerance=self._clock_tolerance,
                metrics=metrics,
                signing_keys=self._signing_keys,
            )
            self._consumer_tag = await self._queue.consume(self._consumer.on_message)
            if self._event_handlers:
                await self._consume_events(self._pool, self._connection, self._channel)
        except ChannelAccessRefused as exc:
            await self.stop()
            raise self._refused(exc) from exc
        except BaseException:
            await self.stop()
            raise
        log.info(
            "participant %s consuming %s (%s)",
            self.service,
            topology.participant_queue(self.service),
            ", ".join(self.actions),
        )

    async def _declare(
        self, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> AbstractQueue:
        """The core topology (declared, or checked when this user may not declare it),
        then this service's queue."""
        await topology.ensure_core(connection)
        return await topology.declare_participant_queue(channel, self.service, self.actions)

    def _refused(self, exc: ChannelAccessRefused) -> ConfigurationError:
        """The broker refused this service's user something it needs of its own."""
        return ConfigurationError(
            f"RabbitMQ refused this service's user: {amqp.reply_text(exc)}. It needs the "
            f"permissions that `sagaplane rabbitmq-permissions --service {self.service}` "
            f"prints, and actions named {self.service}.*"
        )

    async def _consume_events(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        connection: AbstractRobustConnection,
        channel: AbstractChannel,
    ) -> None:
        self._event_dead_letters = DeadLetters(
            connection, queue=topology.events_queue(self.service)
        )
        self._events_queue = await topology.declare_events_queue(
            channel, self.service, self.event_patterns
        )
        self._event_consumer = EventConsumer(
            service=self.service,
            pool=pool,
            handlers=self._event_handlers,
            dead_letters=self._event_dead_letters,
            stopping=self._stop_requested,
            task_prefix=self._name,
            max_attempts=self._event_max_attempts,
            retry_initial=self._event_retry_initial,
            retry_max=self._event_retry_max,
        )
        self._events_tag = await self._events_queue.consume(self._event_consumer.on_message)
        log.info(
            "participant %s consuming events from %s (%s)",
            self.service,
            self._events_queue.name,
            ", ".join(self.event_patterns),
        )

    def _prune_loop(self, pool: AsyncConnectionPool[AsyncConnection[Any]]) -> retention.PruneLoop:
        jobs: dict[str, retention.Job] = {}
        inbox, outbox = self._inbox_retention, self._outbox_retention
        if inbox is not None:
            jobs["inbox rows"] = functools.partial(_prune_inbox, pool, inbox)
        if outbox is not None:
            jobs["outbox rows"] = functools.partial(_prune_outbox, pool, outbox)
        return retention.PruneLoop(
            jobs, interval=self._prune_interval, name=f"{self._name}-retention"
        )

    async def _serve_metrics(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]]
    ) -> ParticipantMetrics | None:
        """Start the metrics endpoint if asked for; the participant's metrics, or None."""
        if self._metrics_listen is None:
            return None
        registry = new_registry()
        metrics = ParticipantMetrics(registry)
        outbox = OutboxGauges(pool)
        registry.register(outbox)
        registry.register(DeadLetterCollector(lambda: self.dead_lettered))
        self._metrics_server = MetricsServer(registry, self._metrics_listen, refresh=outbox.refresh)
        try:
            await self._metrics_server.start()
        except OSError as exc:
            raise ConfigurationError(
                f"metrics_listen: cannot listen on {self._metrics_listen}: {exc.strerror or exc}"
            ) from exc
        log.info("participant %s: metrics on port %d", self.service, self._metrics_server.port)
        return metrics

    async def stop(self) -> None:
        """Stop gracefully; safe to call twice, concurrently, or before start() finished.

        In order: stop consuming; let in-flight commands finish (up to
        ``shutdown_timeout``, then cancel them); publish the replies already committed
        (best effort) and stop the relay; close the AMQP connection and the pool.
        """
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown(), name=f"{self._name}-stop")
        # Shielded: a caller that is cancelled must not leave the shutdown half done.
        await asyncio.shield(self._shutdown_task)

    def main(self, *, event_loop: str = "uvloop") -> NoReturn:
        """Run as a program until SIGTERM or Ctrl-C, then exit: status 0 after a clean
        stop, 3 with one line on stderr when PostgreSQL or RabbitMQ cannot be reached,
        2 for a configuration error. Logs go to stderr unless logging is set up: at
        ``SAGAPLANE_LOG_LEVEL`` (INFO), as ``SAGAPLANE_LOG_FORMAT`` (``text``, or ``json``
        for one JSON object per line; see :mod:`sagaplane.logs`)."""
        if not logging.getLogger().handlers:
            log_format = os.environ.get("SAGAPLANE_LOG_FORMAT", "text")
            if log_format not in logs.FORMATS:
                print(
                    f"{self.service}: SAGAPLANE_LOG_FORMAT must be one of "
                    f"{', '.join(logs.FORMATS)}, not {log_format!r}",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            logs.configure(os.environ.get("SAGAPLANE_LOG_LEVEL", "INFO").upper(), log_format)
        try:
            runtime.run(self.run(), event_loop=event_loop)
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            print(f"{self.service}: {redact(exc.message)}", file=sys.stderr)
            raise SystemExit(3) from None
        except ConfigurationError as exc:
            print(f"{self.service}: {redact(exc.message)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C: run() has stopped gracefully already
            pass
        finally:
            tracing.shutdown()  # the spans still buffered are exported
        raise SystemExit(0)

    async def run(self, *, handle_sigterm: bool = True) -> None:
        """Start, then serve until :meth:`stop`, SIGTERM or cancellation; then stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        # SIGINT is left alone: asyncio.run() turns it into cancellation, which stops too.
        watch_sigterm = handle_sigterm and threading.current_thread() is threading.main_thread()
        if watch_sigterm:
            loop.add_signal_handler(signal.SIGTERM, self._stop_requested.set)
        try:
            await self._stop_requested.wait()
        finally:
            if watch_sigterm:
                loop.remove_signal_handler(signal.SIGTERM)
            await self.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _shutdown(self) -> None:
        self._stop_requested.set()
        if self._queue is not None and self._consumer_tag is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the channel may already be gone; closing it below
                log.warning("participant %s: cancelling the consumer: %s", self.service, exc)
        if self._events_queue is not None and self._events_tag is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._events_queue.cancel(self._events_tag)
            except Exception as exc:
                log.warning("participant %s: cancelling the event consumer: %s", self.service, exc)
        if self._consumer is not None:
            await self._consumer.drain(self._shutdown_timeout)
        if self._event_consumer is not None:
            await self._event_consumer.drain(self._shutdown_timeout)
        if self._pruner is not None:
            await self._pruner.stop()
        if self._relay is not None:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    # Replies committed since the relay's last cycle go out now rather than
                    # at the next start.
                    await self._relay.relay_once()
            except Exception as exc:
                log.warning("participant %s: final relay cycle: %s", self.service, exc)
            try:
                await self._relay.stop()
            except Exception:
                log.exception("participant %s: the outbox relay had crashed", self.service)
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._event_dead_letters is not None:
            await self._event_dead_letters.close()
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._pool is not None:
            await self._pool.close()
        log.info("participant %s stopped", self.service)
