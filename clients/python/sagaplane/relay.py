"""The outbox relay: publishes ``sagaplane_outbox`` rows to RabbitMQ, at least once.

One relay serves the coordinator and every participant. A cycle claims a batch of
unsent rows (``FOR UPDATE SKIP LOCKED``, so any number of relays can share a table),
publishes them with publisher confirms, awaiting the confirms as one window, marks the
confirmed rows sent in one statement, and commits. A row is marked sent only after the
broker confirmed it, so a crash anywhere repeats a publish but never loses one. For the
same reason the relay's commit does not wait for its WAL flush
(``synchronous_commit = off`` for that transaction only): a "sent" lost in a crash is
one more publish, which receivers deduplicate. A cycle is two round trips to
PostgreSQL (``BEGIN`` + claim, then mark + ``COMMIT``; see :mod:`sagaplane.batch`), and
one more with ``track_delivery``: the publishes counted, and committed, before they are
made (:mod:`sagaplane.delivery` says why).

A failed publish is charged to its row (``attempts``, ``last_error``; parked once
``attempts`` reaches ``max_attempts``; retried after an exponential backoff with jitter,
:mod:`sagaplane.backoff`) only when it is that row's fault:

- the broker returned it (``mandatory``: no queue is bound for its routing key; not
  for a domain event, published to ``sagaplane.events`` without ``mandatory``),
  nacked it, or its exchange does not exist (checked passively, on a side channel,
  before the first publish to each exchange: a publish to a missing exchange would
  close the channel under every other publish in flight);
- the broker closed the channel under it: every publish in flight fails then, not
  only the guilty one, so those rows are published again one at a time, and a
  channel closed under a lone publish is that row's fault.

A lost connection or a broker that does not answer in time is nobody's fault: no
attempt is charged (an outage never parks a row, however long it lasts), but the error
is recorded on the rows that did not go out (``failed_at``, ``last_error``: their status
is ``failed``), so that an operator sees what is stuck and why. While the broker stays
away, each cycle records it on the batch it was about to publish, and expires what is
past ``max_age``; PostgreSQL is still there. The relay backs off, reconnects, and
publishes its next batch one row at a time, so that a row which takes the connection
down with it (aiormq can turn a channel error into a connection error) is found and
charged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aiormq
import psycopg
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from psycopg import AsyncClientCursor, sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from sagaplane import amqp, backoff, batch
from sagaplane.queries import q
from sagaplane.relay_settings import RelaySettings
from sagaplane.runtime import log_crash
from sagaplane.topology import CONTENT_TYPE, EVENT_CONTENT_TYPE, EVENTS_EXCHANGE
from sagaplane.urls import redact

__all__ = ["NOTIFY_CHANNEL", "OutboxRelay"]

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sagaplane_outbox"
"""The channel that the outbox's insert trigger notifies at commit."""

TASK_NAME = "sagaplane-outbox-relay"
"""The name of the relay's background task (and, by default, of its AMQP connection)."""

_CLAIM = q("relay_claim")
# Not waiting for the WAL flush: see the module docstring and the statement's comment.
_NO_SYNC = q("relay_no_sync")
_MARK_SENT = q("relay_mark_sent")
_MARK_FAILED = q("relay_mark_failed")
_MARK_INVALID = q("relay_mark_invalid")
_MARK_UNREACHABLE = q("relay_mark_unreachable")
_MARK_INTERRUPTED = q("relay_mark_interrupted")
_EXPIRE = q("relay_expire")
_BEGIN_PUBLISHES = q("relay_begin_publishes")
_FORGET_PUBLISHES = q("relay_forget_publishes")

# Errors after which the loop backs off and tries again rather than dying.
_RECOVERABLE: tuple[type[BaseException], ...] = (
    psycopg.Error,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)

_MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, kw_only=True, slots=True)
class _Row:
    id: int
    message_id: str
    exchange: str
    routing_key: str
    message_type: str
    body: bytes
    correlation_id: str | None
    attempts: int
    headers: dict[str, Any] | None


@dataclass(kw_only=True, slots=True)
class _Outcome:
    sent: list[int]
    failed: list[tuple[_Row, str]]
    returned: set[int] = field(default_factory=set)
    """Ids of the failed rows that the broker returned as unroutable."""
    transport_error: BaseException | None = None
    # Rows that can never be published (a missing exchange): parked at once as invalid.
    invalid: list[tuple[_Row, str]] = field(default_factory=list)

    def fail(self, row: _Row, result: object) -> None:
        self.failed.append((row, _describe(result)))
        if isinstance(result, aiormq.exceptions.PublishError):
            self.returned.add(row.id)


class _Kind(enum.Enum):
    SENT = enum.auto()
    ROW = enum.auto()
    """The row's fault: returned (unroutable), nacked, or invalid."""
    CHANNEL = enum.auto()
    """The channel closed under it; whose fault is not known yet."""
    TRANSPORT = enum.auto()
    """Nobody's fault: the connection was lost or the broker did not answer in time."""


class OutboxRelay:
    """Publishes outbox rows to RabbitMQ with publisher confirms, woken by NOTIFY.

    ``pool`` serves the claim transactions. ``amqp`` is an AMQP URL (the relay then
    owns a robust connection and closes it on :meth:`stop`) or a robust connection
    owned by the caller (the relay opens and closes only its own channel). The relay
    LISTENs on a dedicated autocommit connection made from ``listen_conninfo``, by
    default the pool's conninfo and connection arguments; give a direct server address
    when the pool goes through a transaction-pooling proxy, where LISTEN does not work.

    The relay only publishes: declare the exchanges and queues before rows need them,
    as an unroutable row counts as a failed publish.

    ``batch_size`` rows are claimed and published per cycle; ``poll_interval`` seconds
    is the longest an idle relay waits when no NOTIFY comes; a row is parked once it
    has failed ``max_attempts`` times by its own fault, its attempts spaced by an
    exponential backoff with jitter (:func:`sagaplane.backoff.delay`: the n-th wait is
    between half and all of ``retry_initial * 2**n``, at most ``retry_max`` seconds;
    7.5 to 15 minutes in all with the defaults); a publish not confirmed within
    ``confirm_timeout`` seconds counts as a lost connection, as does a connection not
    back within it; reconnections back off up to ``max_backoff`` seconds; :meth:`stop`
    waits ``shutdown_timeout`` seconds for the cycle in progress; ``connection_name``
    names the AMQP connection in the broker. With ``max_age`` (seconds; None, the
    default, for never), a row not published that long after it was written is parked
    as ``expired`` and never published. A row whose exchange does not exist is parked as
    ``invalid`` at once. A row the broker's absence kept from going out is ``failed``
    with the error, never charged an attempt. Each row's ``status`` (see
    ``sql/outbox/0006_failed_at.sql``) shows where it is.

    Every publish the broker returns as unroutable is counted on its row (``returned``).
    With ``track_delivery`` (the coordinator's relay) every publish is also counted
    before it is made, in a transaction of its own, so that a row can be proven never
    delivered (:mod:`sagaplane.delivery`); that costs one more round trip and commit
    per batch, on a connection of the relay's own (made like the LISTEN connection).

    Use ``async with relay:`` or :meth:`start` / :meth:`stop` to run it in the
    background; :meth:`run` to supervise it yourself (e.g. in a task group);
    :meth:`relay_once` for one cycle.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        amqp: str | AbstractRobustConnection,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        max_attempts: int = 20,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        confirm_timeout: float = 30.0,
        max_backoff: float = 5.0,
        shutdown_timeout: float = 10.0,
        listen_conninfo: str | None = None,
        connection_name: str = TASK_NAME,
        max_age: float | None = None,
        track_delivery: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_age is not None and not max_age > 0:
            raise ValueError("max_age must be a positive number of seconds, or None")
        self._max_age = max_age
        self._pool = pool
        self._amqp_url = amqp if isinstance(amqp, str) else None
        self._connection: AbstractRobustConnection | None = None if isinstance(amqp, str) else amqp
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_attempts = max_attempts
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._confirm_timeout = confirm_timeout
        self._max_backoff = max_backoff
        self._shutdown_timeout = shutdown_timeout
        self._listen_conninfo = listen_conninfo
        self._connection_name = connection_name
        self._track_delivery = track_delivery
        # Autocommit: each count commits on its own (see _begin_publishes).
        self._counts_conn: psycopg.AsyncConnection[Any] | None = None

        self._channel: AbstractChannel | None = None
        # Why the AMQP connection was last lost, or failed to come back (aio-pika hands its
        # close callbacks both), for the error recorded on the rows while it is away.
        self._lost: str | None = None
        self._watched: AbstractRobustConnection | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._known_exchanges: set[str] = set()
        # After a lost connection, publish the next batch a row at a time (see above).
        self._one_by_one = False
        # Serialises cycles: relay_once() called while the loop runs must not share
        # the channel's confirm bookkeeping with it.
        self._cycle_lock = asyncio.Lock()
        # Set by a notification, a (re)connected listener, and stop(): the one thing
        # an idle relay waits on (with the poll interval as timeout).
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        # Set while no run() is in progress, so that stop() knows when it may close.
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @classmethod
    def from_settings(
        cls,
        pool: AsyncConnectionPool[Any],
        amqp: str | AbstractRobustConnection,
        settings: RelaySettings,
        **options: Any,
    ) -> OutboxRelay:
        """A relay with the operator's ``settings`` (batch size, poll interval, max
        attempts, max age: :class:`~sagaplane.relay_settings.RelaySettings`, the one
        place that maps them); ``options`` are the other arguments of the constructor."""
        return cls(
            pool,
            amqp,
            batch_size=settings.batch_size,
            poll_interval=settings.poll_interval,
            max_attempts=settings.max_attempts,
            max_age=settings.max_age,
            **options,
        )

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The background task while :meth:`start` runs it; its end means trouble."""
        return self._task

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

    async def start(self) -> None:
        """Run the relay in a background task named ``sagaplane-outbox-relay``.

        Calling it while running does nothing; a stopped relay cannot be restarted.
        """
        if self._stopped:
            raise RuntimeError("a stopped OutboxRelay cannot be restarted")
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=TASK_NAME)
            self._task.add_done_callback(log_crash(logger, "outbox relay"))

    async def stop(self) -> None:
        """Stop the relay and release its connections. Safe to call twice, or unstarted.

        Also ends a :meth:`run` that the caller awaits itself. The cycle in progress is
        allowed to finish (up to ``shutdown_timeout``) so that its confirmed rows get
        marked sent. If the background task had crashed, the first call re-raises its
        exception (it was also logged when it happened).
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._wakeup.set()
        task, self._task = self._task, None
        try:
            try:
                async with asyncio.timeout(self._shutdown_timeout):
                    await self._idle.wait()
            except TimeoutError:
                logger.warning("outbox relay did not stop within %ss", self._shutdown_timeout)
                if task is not None:
                    task.cancel()
            if task is not None:
                await asyncio.wait({task})
                if not task.cancelled() and (crash := task.exception()) is not None:
                    raise crash
        finally:
            await self._close_amqp()

    async def run(self) -> None:
        """Relay until :meth:`stop` is called; raises only on an unexpected error.

        Wakes on NOTIFY, every ``poll_interval`` seconds, or on stop. Connection errors
        (PostgreSQL or RabbitMQ) are logged, backed off (capped at ``max_backoff``) and
        retried. Call :meth:`stop` to end it and release the connections.
        """
        if not self._idle.is_set():
            raise RuntimeError("OutboxRelay.run() is already running")
        self._idle.clear()
        listener = asyncio.create_task(self._listen(), name=f"{TASK_NAME}-listener")
        failures = 0
        try:
            while not self._stopping.is_set():
                self._wakeup.clear()
                try:
                    # Drain while full batches come back and they make progress; a full
                    # batch that all failed would otherwise be retried in a tight loop.
                    while not self._stopping.is_set():
                        claimed, sent = await self._cycle()
                        if claimed < self._batch_size or sent == 0:
                            break
                except _RECOVERABLE as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    logger.warning(
                        "outbox relay: %s: %s; retrying in %.2fs",
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await self._sleep_unless_stopping(delay)
                    continue
                failures = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wakeup.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            self._idle.set()

    async def relay_once(self) -> int:
        """Claim one batch, publish it, record the outcome, commit; returns rows sent.

        Raises the underlying psycopg / aio-pika error when a connection fails (what
        was confirmed before is still marked sent, nothing else is touched).
        """
        _, sent = await self._cycle()
        return sent

    async def _cycle(self) -> tuple[int, int]:
        async with self._cycle_lock:
            try:
                # Ready before claiming, so rows are not locked while the broker is away.
                channel = await self._ready_channel()
            except _RECOVERABLE as exc:
                await self._discard_channel()
                await self._record_unreachable(exc)
                raise
            async with self._batch_cursor() as cur:
                [claimed] = await batch.run(
                    cur,
                    [
                        ("BEGIN", None),
                        (_NO_SYNC, None),
                        *self._expire(),
                        (_CLAIM, (self._batch_size,)),
                    ],
                )
                rows = [_to_row(r) for r in claimed]
                if not rows:
                    await cur.execute("COMMIT")
                    return 0, 0
                outcome = await self._publish(channel, rows)
                await batch.run(cur, [*self._record(outcome, rows), ("COMMIT", None)])
            if outcome.transport_error is not None:
                self._one_by_one = True
                # A channel that timed out may be stuck; the next cycle opens a fresh one.
                await self._discard_channel()
                raise outcome.transport_error
            self._one_by_one = False
            return len(rows), len(outcome.sent)

    @contextlib.asynccontextmanager
    async def _batch_cursor(
        self, pool_wait: float | None = None
    ) -> AsyncIterator[AsyncClientCursor[tuple[Any, ...]]]:
        """A cursor for :func:`sagaplane.batch.run` on a connection of the pool (waiting at
        most ``pool_wait`` seconds for one; the pool's timeout by default); what the caller
        began is rolled back if it fails."""
        async with self._pool.connection(timeout=pool_wait) as conn:
            # Batches need an autocommit connection (see sagaplane.batch); a pool of the
            # caller's may hand out others, which get their setting back.
            restore = not conn.autocommit
            if restore:
                await conn.set_autocommit(True)
            try:
                yield AsyncClientCursor(conn, row_factory=tuple_row)
            except BaseException:
                await batch.rollback_after_error(conn)
                raise
            finally:
                if restore and not conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        await conn.set_autocommit(False)

    def _expire(self) -> list[batch.Statement]:
        if self._max_age is None:
            return []
        return [(_EXPIRE, {"max_age": self._max_age})]

    async def _record_unreachable(self, exc: BaseException) -> None:
        """Record ``exc`` on the rows the relay was about to publish (their status:
        ``failed``, no attempt charged), and expire what is past ``max_age``: the broker
        is away, PostgreSQL need not be. A database that fails too is only logged here:
        the broker's error is the one the caller raises."""
        statements: list[batch.Statement] = [
            ("BEGIN", None),
            (_NO_SYNC, None),
            *self._expire(),
            (_MARK_UNREACHABLE, {"error": _describe(exc), "limit": self._batch_size}),
            ("COMMIT", None),
        ]
        try:
            # Not the pool's whole timeout: the loop must get back to the broker.
            async with self._batch_cursor(pool_wait=self._confirm_timeout) as cur:
                await batch.run(cur, statements)
        except psycopg.Error as db_exc:
            logger.warning(
                "outbox relay: could not record that RabbitMQ is unreachable: %s: %s",
                type(db_exc).__name__,
                db_exc,
            )

    async def _publish(self, channel: AbstractChannel, rows: list[_Row]) -> _Outcome:
        outcome = _Outcome(sent=[], failed=[])
        missing = await self._missing_exchanges({row.exchange for row in rows})
        pending: list[_Row] = []
        for row in rows:
            if row.exchange in missing:
                outcome.invalid.append((row, missing[row.exchange]))
            else:
                pending.append(row)
        if self._one_by_one:
            await self._publish_alone(pending, outcome)
            return outcome
        suspects: list[_Row] = []
        # aiormq matches a basic.return to its publish by message_id, so two publishes
        # in flight must never share one: repeated ids go out in a later wave.
        waves = _waves(pending)
        for index, wave in enumerate(waves):
            await self._begin_publishes(wave)
            results = await asyncio.gather(
                *(self._publish_row(channel, row) for row in wave), return_exceptions=True
            )
            for row, result in zip(wave, results, strict=True):
                kind = _classify(result)
                if kind is _Kind.SENT:
                    outcome.sent.append(row.id)
                elif kind is _Kind.ROW:
                    outcome.fail(row, result)
                elif kind is _Kind.CHANNEL:
                    suspects.append(row)
                elif outcome.transport_error is None:
                    outcome.transport_error = _as_exception(result)
            if outcome.transport_error is not None:
                return outcome
            if suspects:
                suspects.extend(row for later in waves[index + 1 :] for row in later)
                break
        # A closed channel fails every publish in flight, even ones published before
        # the guilty one whose confirms had not arrived yet.
        await self._publish_alone(suspects, outcome)
        return outcome

    async def _publish_alone(self, rows: list[_Row], outcome: _Outcome) -> None:
        """Publish ``rows`` one at a time, so that each failure has one culprit."""
        for row in rows:
            try:
                channel = await self._ready_channel()
            except _RECOVERABLE as exc:
                outcome.transport_error = exc
                return
            await self._begin_publishes([row])
            [result] = await asyncio.gather(self._publish_row(channel, row), return_exceptions=True)
            kind = _classify(result)
            if kind is _Kind.SENT:
                outcome.sent.append(row.id)
            elif kind is _Kind.ROW or isinstance(result, aiormq.exceptions.ChannelClosed):
                outcome.fail(row, result)
            else:
                outcome.transport_error = _as_exception(result)
                return

    async def _begin_publishes(self, rows: list[_Row]) -> None:
        """Count a publish begun for each of ``rows``, committed before any is published.

        Only with ``track_delivery``. On a connection of its own: the claim's transaction
        holds the rows' locks and commits only after the publishes, and a crash in
        between must still leave the count behind (see :mod:`sagaplane.delivery`). The
        commit waits for its WAL flush, unlike the claim's.
        """
        if not self._track_delivery or not rows:
            return
        # A connection of the relay's own, not the pool's: the claim holds one already,
        # and waiting for a second behind the pool's other users would hold the rows.
        if self._counts_conn is None or self._counts_conn.closed:
            conninfo, kwargs = await self._listen_params()
            self._counts_conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        try:
            await self._counts_conn.execute(_BEGIN_PUBLISHES, ([row.id for row in rows],))
        except BaseException:
            conn, self._counts_conn = self._counts_conn, None
            with contextlib.suppress(Exception):
                await conn.close()
            raise

    async def _missing_exchanges(self, names: set[str]) -> dict[str, str]:
        """Passively declare the exchanges not seen yet; the missing ones, with the error."""
        unknown = sorted(names - self._known_exchanges - {""})
        if not unknown:
            return {}
        assert self._connection is not None
        missing: dict[str, str] = {}
        # A side channel: the broker closes a channel on a failed passive declare.
        side: aio_pika.Channel | None = None
        try:
            async with asyncio.timeout(self._confirm_timeout):
                for name in unknown:
                    if side is None or side.is_closed:
                        side = aio_pika.Channel(self._connection, publisher_confirms=False)
                        await side.initialize()
                    try:
                        await side.get_exchange(name, ensure=True)
                    except (aiormq.exceptions.ChannelClosed, ValueError) as exc:
                        missing[name] = _describe(exc)
                    else:
                        self._known_exchanges.add(name)
        except RuntimeError as exc:  # aiormq's "connection closed" while opening
            raise ConnectionError(f"AMQP connection unavailable: {exc}") from exc
        finally:
            if side is not None and not side.is_closed:
                with contextlib.suppress(Exception):
                    await side.close()
        return missing

    async def _publish_row(self, channel: AbstractChannel, row: _Row) -> object:
        exchange = self._exchanges.get(row.exchange)
        if exchange is None:
            exchange = await channel.get_exchange(row.exchange, ensure=False)
            self._exchanges[row.exchange] = exchange
        # A domain event is publish/subscribe: no queue bound for its type is no failure
        # (not mandatory, so the broker drops it rather than returning it).
        is_event = row.exchange == EVENTS_EXCHANGE
        message = aio_pika.Message(
            row.body,
            message_id=row.message_id,
            type=row.message_type,
            content_type=EVENT_CONTENT_TYPE if is_event else CONTENT_TYPE,
            correlation_id=row.correlation_id,
            headers=row.headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # The timeout also covers waiting for a reconnecting connection, which
        # aio-pika does before it writes anything.
        async with asyncio.timeout(self._confirm_timeout):
            return await exchange.publish(message, row.routing_key, mandatory=not is_event)

    def _record(self, outcome: _Outcome, rows: list[_Row]) -> list[batch.Statement]:
        """The statements that record ``outcome`` of publishing ``rows`` (logging what
        failed)."""
        statements: list[batch.Statement] = []
        if outcome.transport_error is not None:
            settled = {*outcome.sent, *(r.id for r, _ in outcome.failed)}
            settled.update(r.id for r, _ in outcome.invalid)
            if unsettled := [row.id for row in rows if row.id not in settled]:
                error = _describe(outcome.transport_error)
                statements.append((_MARK_INTERRUPTED, {"ids": unsettled, "error": error}))
        if outcome.sent:
            statements.append((_MARK_SENT, (outcome.sent,)))
            if self._track_delivery:
                # A sent row can never count as undelivered: its counts are not needed.
                statements.append((_FORGET_PUBLISHES, (outcome.sent,)))
        if outcome.invalid:
            statements.append(
                (
                    _MARK_INVALID,
                    {
                        "ids": [row.id for row, _ in outcome.invalid],
                        "errors": [error for _, error in outcome.invalid],
                    },
                )
            )
            logger.error(
                "outbox rows that can never be published, parked as invalid: %s",
                ", ".join(
                    f"{row.id} (message {row.message_id}): {e}" for row, e in outcome.invalid
                ),
            )
        if outcome.failed:
            statements.append(
                (
                    _MARK_FAILED,
                    {
                        "max_attempts": self._max_attempts,
                        "ids": [row.id for row, _ in outcome.failed],
                        "errors": [error for _, error in outcome.failed],
                        "returned": [row.id in outcome.returned for row, _ in outcome.failed],
                        # The row's failures so far, this one included (1 for the first).
                        "delays": [
                            backoff.delay(
                                row.attempts + 1,
                                initial=self._retry_initial,
                                maximum=self._retry_max,
                            )
                            for row, _ in outcome.failed
                        ],
                    },
                )
            )
            parked = [row for row, _ in outcome.failed if row.attempts + 1 >= self._max_attempts]
            for row, error in outcome.failed:
                logger.warning(
                    "outbox row %d (message %s) not published (attempt %d): %s",
                    row.id,
                    row.message_id,
                    row.attempts + 1,
                    error,
                )
            if parked:
                logger.error(
                    "outbox rows parked after %d attempts, a person must look at them: %s",
                    self._max_attempts,
                    ", ".join(f"{row.id} (message {row.message_id})" for row in parked),
                )
        return statements

    async def _ready_channel(self) -> AbstractChannel:
        try:
            async with asyncio.timeout(self._confirm_timeout):
                if self._connection is None:
                    assert self._amqp_url is not None
                    options: dict[str, Any] = {}
                    if "reconnect_interval" not in parse_qs(urlsplit(self._amqp_url).query):
                        # aio-pika waits 5 s by default; rows wait for the reconnect.
                        options["reconnect_interval"] = 1.0
                    self._connection = await amqp.connect(
                        self._amqp_url,
                        name=self._connection_name,
                        timeout=self._confirm_timeout,
                        **options,
                    )
                self._watch(self._connection)
                await self._connection.ready()
                if self._channel is not None and self._channel.is_closed:
                    await self._discard_channel()
                if self._channel is None:
                    # A plain channel, not a robust one: a robust channel reopens itself
                    # after the broker closed it, and a publish in that window (its
                    # ready() can return before it noticed the close) makes the broker
                    # close the whole connection (504 "expected 'channel.open'").
                    channel = aio_pika.Channel(
                        self._connection, publisher_confirms=True, on_return_raises=True
                    )
                    await channel.initialize()
                    self._channel = channel
                return self._channel
        except RuntimeError as exc:  # aiormq's "connection closed" while opening
            raise ConnectionError(f"AMQP connection unavailable: {exc}") from exc
        except TimeoutError as exc:
            # The words an operator reads on the rows (a bare TimeoutError says nothing).
            where = redact(self._amqp_url) if self._amqp_url else str(self._connection)
            within = f"within {self._confirm_timeout:g}s"
            if self._connection is not None and self._connection.connected.is_set():
                raise ConnectionError(f"RabbitMQ at {where} opened no channel {within}") from exc
            why = f"last error: {self._lost}" if self._lost else "down, or unreachable"
            raise ConnectionError(f"no connection to RabbitMQ at {where} {within} ({why})") from exc

    def _watch(self, connection: AbstractRobustConnection) -> None:
        """Keep why ``connection`` was last lost or failed to reconnect (once per
        connection)."""
        if self._watched is not connection:
            connection.close_callbacks.add(self._on_connection_lost)
            self._watched = connection

    def _on_connection_lost(self, _connection: object, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self._lost = _describe(exc)

    async def _discard_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._exchanges.clear()
        # Exchanges are checked again after trouble: one may have been deleted.
        self._known_exchanges.clear()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._confirm_timeout):
                    await channel.close()

    async def _close_amqp(self) -> None:
        if self._counts_conn is not None:
            conn, self._counts_conn = self._counts_conn, None
            with contextlib.suppress(Exception):
                await conn.close()
        await self._discard_channel()
        if self._watched is not None:
            watched, self._watched = self._watched, None
            # The caller's connection outlives the relay; it must not call back into it.
            with contextlib.suppress(RuntimeError):  # a frozen collection (closing)
                watched.close_callbacks.discard(self._on_connection_lost)
        if self._amqp_url is not None and self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._confirm_timeout):
                    await connection.close()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conninfo, kwargs = await self._listen_params()
                conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    failures = 0
                    # Catch up with what was committed while nobody was listening.
                    self._wakeup.set()
                    async for _ in conn.notifies():
                        self._wakeup.set()
            except psycopg.Error as exc:
                failures += 1
                delay = self._backoff(failures)
                logger.warning(
                    "outbox relay: LISTEN connection: %s; reconnecting in %.2fs", exc, delay
                )
                await asyncio.sleep(delay)
            except Exception:
                # Polling still covers for the listener, but this must not go unnoticed.
                failures += 1
                logger.exception("outbox relay: LISTEN connection failed unexpectedly")
                await asyncio.sleep(self._backoff(failures))

    async def _listen_params(self) -> tuple[str, dict[str, Any]]:
        if self._listen_conninfo is not None:
            return self._listen_conninfo, {"autocommit": True}
        # The pool's settings may be callables (e.g. short-lived credentials).
        conninfo = await _resolve(self._pool.conninfo)
        kwargs = await _resolve(self._pool.kwargs)
        return str(conninfo or ""), {**(kwargs or {}), "autocommit": True}

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()

    def _backoff(self, failures: int) -> float:
        return backoff.delay(failures, maximum=self._max_backoff)


def _to_row(record: Sequence[Any]) -> _Row:
    return _Row(
        id=record[0],
        message_id=record[1],
        exchange=record[2],
        routing_key=record[3],
        message_type=record[4],
        body=bytes(record[5]),
        correlation_id=record[6],
        attempts=record[7],
        headers=record[8],
    )


def _waves(rows: list[_Row]) -> list[list[_Row]]:
    waves: list[list[_Row]] = []
    seen: list[set[str]] = []
    for row in rows:
        for wave, ids in zip(waves, seen, strict=True):
            if row.message_id not in ids:
                wave.append(row)
                ids.add(row.message_id)
                break
        else:
            waves.append([row])
            seen.append({row.message_id})
    return waves


def _classify(result: object) -> _Kind:
    match result:
        case aiormq.spec.Basic.Ack():
            return _Kind.SENT
        # Returned (PublishError), nacked or rejected (DeliveryError), or a name the
        # client library refused to send (ValueError).
        case aiormq.exceptions.DeliveryError() | ValueError():
            return _Kind.ROW
        case (
            aiormq.exceptions.ChannelClosed()
            | aiormq.exceptions.ChannelInvalidStateError()
            | asyncio.CancelledError()
        ):
            return _Kind.CHANNEL
        case BaseException() if isinstance(result, _RECOVERABLE):
            return _Kind.TRANSPORT
        case BaseException():
            # A bug, not an outage: fail loudly (the transaction rolls back).
            raise result
        case _:
            # What a returned message looks like when on_return_raises is off.
            return _Kind.ROW


def _describe(result: object) -> str:
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"[:_MAX_ERROR_CHARS]
    return f"not confirmed by the broker: {result!r}"[:_MAX_ERROR_CHARS]


def _as_exception(result: object) -> BaseException:
    if isinstance(result, BaseException):
        return result
    return RuntimeError(f"unexpected publish result {result!r}")


async def _resolve(value: object) -> Any:
    if callable(value):
        value = value()
        if inspect.isawaitable(value):
            value = await value
    return value
