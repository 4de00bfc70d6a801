"""The coordinator process: wires store, API server and messaging, and shuts down in order."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from aio_pika.abc import AbstractRobustConnection
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from coordinator import config, tracing
from coordinator.api.auth import AccessControl, AccessFileError, AuthInterceptor
from coordinator.api.page_tokens import PageTokens
from coordinator.api.server import ApiServer
from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.api.tls import TlsFileError, server_credentials
from coordinator.config import Settings
from coordinator.messaging.codec import command_encoder
from coordinator.messaging.replies import ReplyConsumer
from coordinator.metrics import CoordinatorMetrics
from coordinator.retention import Pruner
from coordinator.store.migrate import migrate
from coordinator.store.notifications import Listener
from coordinator.store.pool import open_pool
from coordinator.store.repository import Observed, Observer, SagaStore
from coordinator.timers import TimerLoop
from sagaplane import amqp, signing, topology
from sagaplane import tracing as sagaplane_tracing
from sagaplane.client import SagaClient
from sagaplane.consuming import DeadLetters
from sagaplane.metrics import DeadLetterCollector, MetricsServer, OutboxGauges, new_registry
from sagaplane.relay import OutboxRelay
from sagaplane.retention import PruneLoop

if TYPE_CHECKING:
    from coordinator.web import WebServer

log = logging.getLogger(__name__)


class Coordinator:
    """One coordinator process. Holds no saga state of its own: run as many as you like."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._api: ApiServer | None = None
        self._amqp: AbstractRobustConnection | None = None
        self._replies: ReplyConsumer | None = None
        self._dead_letters: DeadLetters | None = None
        self._relay: OutboxRelay | None = None
        self._timers: TimerLoop | None = None
        self._retention: PruneLoop | None = None
        self.listener: Listener | None = None
        """What wakes WatchSaga's watchers, once started."""
        self.store: SagaStore | None = None
        """The saga store, once started."""
        self._metrics_server: MetricsServer | None = None
        self._web: WebServer | None = None
        self._web_client: SagaClient | None = None
        self.access: AccessControl | None = None
        """Who may call what, once started; None when access control is off."""
        self._stopped = False

    @property
    def port(self) -> int:
        """The gRPC port actually bound (useful with port 0)."""
        assert self._api is not None, "start() first"
        return self._api.port

    @property
    def metrics_port(self) -> int | None:
        """The port of ``/metrics`` (useful with port 0); None when metrics are off."""
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def http_port(self) -> int | None:
        """The port of the operator web page (useful with port 0); None when it is off."""
        return self._web.port if self._web is not None else None

    @property
    def dead_lettered(self) -> Mapping[str, int]:
        """Replies dead-lettered by this process, by cause (see messaging.replies)."""
        return self._dead_letters.counts if self._dead_letters is not None else {}

    async def start(self) -> None:
        """Migrate (unless disabled), open the pool, start serving.

        If any part fails to start, what did start is stopped again before the error
        propagates: no pool or connection is left open behind a failed start.
        """
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        # The address first: a coordinator that cannot serve must not migrate, consume
        # replies or fire timers (a second one on a taken port would take replies that
        # belong to the first one's sagas).
        metrics = CoordinatorMetrics(new_registry()) if self.settings.metrics_listen else None
        credentials, self.access = await asyncio.to_thread(_security, self.settings)
        ring = await asyncio.to_thread(_signing_keys, self.settings)
        # Tracing outermost: the call's span covers everything else done for it; then
        # metrics, so that refused calls are counted; access control innermost.
        interceptors: list[grpc.aio.ServerInterceptor] = [*tracing.interceptors()]
        if metrics is not None:
            interceptors.append(metrics.interceptor())
        if self.access is not None:
            interceptors.append(AuthInterceptor(self.access))
        self._api = await ApiServer.bind(
            self.settings.listen, interceptors=interceptors, credentials=credentials
        )
        if self.settings.migrate:
            applied = await migrate(self.settings.database_url)
            for m in applied:
                log.info("applied migration %s/%04d_%s", m.component, m.version, m.name)
        self._pool = await open_pool(self.settings.database_url, size=self.settings.pool_size)
        self.store = SagaStore(
            self._pool,
            command_encoder(ring),
            observer=_observers(metrics.observe if metrics else None),
        )
        if metrics is not None and self.settings.metrics_listen is not None:
            await self._serve_metrics(metrics, self.settings.metrics_listen)
        self._amqp = await amqp.connect(self.settings.amqp_url, name="sagaplane-coordinator")
        channel = await self._amqp.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        await topology.declare_core(channel)
        # The queue object declare_core() registered on this robust channel (a passive
        # get returns it): only a registered queue gets its consumer back after a
        # reconnection. get_queue(ensure=False) would build an unregistered one, and the
        # coordinator would stop consuming replies for good after RabbitMQ restarts.
        replies = await channel.get_queue(topology.REPLIES_QUEUE)
        # Tracked, so that a command proven never delivered needs no compensation.
        self._relay = OutboxRelay.from_settings(
            self._pool, self._amqp, self.settings.relay, track_delivery=True
        )
        await self._relay.start()
        self._dead_letters = DeadLetters(self._amqp, queue=topology.REPLIES_QUEUE)
        self._replies = ReplyConsumer(self.store, replies, self._dead_letters, signing_keys=ring)
        await self._replies.start()
        self._timers = TimerLoop(
            self.store,
            interval=self.settings.timer_interval,
            on_round=metrics.timer_rounds.observe if metrics is not None else None,
        )
        await self._timers.start()
        self._retention = Pruner(self.store, self._pool, self.settings.retention).loop()
        await self._retention.start()
        tokens = PageTokens(await self.store.secret("page_tokens"))
        self.listener = Listener(self.settings.database_url)
        await self.listener.start()
        self.store.listener = self.listener
        servicer = SagaCoordinatorServicer(
            self.store, tokens, self.listener, watch_send_timeout=self.settings.watch_send_timeout
        )
        await self._api.start(servicer)
        log.info("coordinator listening on port %d", self._api.port)
        if self.settings.http_listen is not None:
            await self._serve_web(self.settings.http_listen)

    async def _serve_web(self, listen: str) -> None:
        # The page acts through this coordinator's own gRPC API (its validation, its
        # access control, its history), never around it.
        from coordinator.web import WebServer  # aiohttp is only loaded when it serves

        assert self._api is not None
        self._web_client = SagaClient(_local_target(self.settings.listen, self._api.port))
        self._web = WebServer(self._web_client, listen)
        await self._web.start()
        log.info("web page at http://%s/", _shown_address(listen, self.http_port))

    async def _serve_metrics(self, metrics: CoordinatorMetrics, listen: str) -> None:
        assert self._pool is not None and self.store is not None
        outbox = OutboxGauges(self._pool)
        metrics.registry.register(outbox)
        metrics.registry.register(DeadLetterCollector(lambda: self.dead_lettered))
        refresh_sagas = metrics.refresher(self.store)

        async def refresh() -> None:
            await asyncio.gather(refresh_sagas(), outbox.refresh())

        self._metrics_server = MetricsServer(metrics.registry, listen, refresh=refresh)
        await self._metrics_server.start()
        log.info("metrics at http://%s/metrics", _shown_address(listen, self.metrics_port))

    async def reload_access(self) -> bool:
        """Reread the access file (on SIGHUP): True if the new one is in force. Calls
        in flight keep the caller they were let in as."""
        if self.access is None:
            log.info("no access file to reload (--auth-tokens is not set)")
            return False
        return await asyncio.to_thread(self.access.reload)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The background tasks whose end means the process must stop."""
        parts = (self._relay, self._replies, self._timers, self._retention, self.listener)
        found = [c.task for c in parts if c is not None]
        return [t for t in found if t is not None]

    async def stop(self) -> None:
        """Health NOT_SERVING, the gRPC server (with grace), replies, timers, relay, pool, AMQP.

        Safe to call twice, and before start() finished.
        """
        if self._stopped:
            return
        self._stopped = True
        # The page first: its event streams are WatchSaga calls the API would wait for.
        if self._web is not None:
            await self._web.stop()
        if self._web_client is not None:
            await self._web_client.close()
        if self._api is not None:
            await self._api.stop(self.settings.grace)
        if self.listener is not None:
            await self.listener.stop()
        if self._replies is not None:
            await self._replies.stop()
        if self._timers is not None:
            await self._timers.stop()
        if self._retention is not None:
            await self._retention.stop()
        if self._dead_letters is not None:
            await self._dead_letters.close()
        if self._relay is not None:
            try:
                await self._relay.stop()
            except Exception:
                log.exception("the outbox relay had crashed")
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._pool is not None:
            await self._pool.close()
        if self._amqp is not None:
            await self._amqp.close()
        log.info("coordinator stopped")

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _observers(metrics: Observer | None) -> Observer | None:
    """The store's observer: the metrics and the spans, whichever are on (None: none)."""
    if not sagaplane_tracing.enabled():
        return metrics
    if metrics is None:
        return tracing.observe

    def both(committed: Sequence[Observed]) -> None:
        metrics(committed)
        tracing.observe(committed)

    return both


def _security(settings: Settings) -> tuple[grpc.ServerCredentials | None, AccessControl | None]:
    """The TLS credentials and access control the settings ask for (blocking file reads);
    ConfigError when they cannot be served."""
    config.check(settings)
    try:
        credentials = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = server_credentials(
                Path(settings.tls_cert),
                Path(settings.tls_key),
                Path(settings.tls_client_ca) if settings.tls_client_ca else None,
            )
        access = AccessControl.load(Path(settings.auth_tokens)) if settings.auth_tokens else None
    except (TlsFileError, AccessFileError) as exc:
        raise config.ConfigError(str(exc)) from None
    return credentials, access


def _signing_keys(settings: Settings) -> signing.KeyRing | None:
    """The signing keys the settings name (a blocking file read); ConfigError when unusable."""
    if settings.signing_keys is None:
        return None
    try:
        ring = signing.KeyRing.load(Path(settings.signing_keys))
    except signing.InvalidKeys as exc:
        raise config.ConfigError(str(exc)) from None
    log.info("signing steps for services %s", ", ".join(sorted(ring.services)))
    return ring


def _shown_address(listen: str, port: int | None) -> str:
    host = listen.rpartition(":")[0]
    return f"{host}:{port}"


def _local_target(listen: str, port: int) -> str:
    """The address this process reaches its own gRPC server at."""
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(settings: Settings, stop: asyncio.Event) -> bool:
    """Run a coordinator until ``stop`` is set; False if a background task died first.
    SIGHUP rereads the access file."""
    async with Coordinator(settings) as coordinator:
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:
            task = loop.create_task(coordinator.reload_access(), name="sagaplane-reload-access")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            stopping = asyncio.create_task(stop.wait(), name="sagaplane-stop-signal")
            done, _ = await asyncio.wait(
                {stopping, *coordinator.tasks()}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                return True
            stopping.cancel()
            log.critical("a background task ended unexpectedly; shutting down")
            return False
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
