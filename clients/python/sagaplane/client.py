"""The asyncio client for the coordinator's whole gRPC API: :class:`SagaClient`.

Methods return :class:`~sagaplane.sagas.Saga` views (state names, dicts for JSON,
datetimes), each with the protobuf it was read from as ``.proto``. Failed calls raise a
:class:`~sagaplane.errors.CoordinatorError` subclass chosen by the gRPC status code
(e.g. :class:`~sagaplane.errors.SagaNotFound`), with the original
``grpc.aio.AioRpcError`` as its ``__cause__``.

The CLI, the demo, the benchmark and the fault suite all talk to the coordinator
through this class, so whatever the API can do, it can do.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sagaplane import backoff, defaults, jsonform, structs, targets, tracing
from sagaplane.durations import to_duration
from sagaplane.errors import (
    CoordinatorError,
    CoordinatorUnavailable,
    FieldViolation,
    InvalidArgument,
    WaitTimeout,
    from_rpc_error,
)
from sagaplane.sagas import TERMINAL_STATES, RetryPolicy, Saga, SagaState
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc, saga_pb2

__all__ = [
    "DEFAULT_TARGET",
    "TERMINAL_STATES",
    "ActivePage",
    "Resolution",
    "RetryPolicy",
    "Saga",
    "SagaClient",
    "SagaState",
    "StartedSaga",
    "StartedSagas",
    "StepSpec",
    "saga_request",
    "tls_credentials",
]

DEFAULT_TARGET = defaults.COORDINATOR_ADDRESS
"""Where the coordinator listens unless ``SAGAPLANE_COORDINATOR`` says otherwise."""

_R = TypeVar("_R")

Seconds = float | timedelta
"""A duration: seconds, or a timedelta."""


@dataclass(frozen=True)
class StepSpec:
    """One step of a saga to start: ``StepSpec("reserve", "stock.reserve", "stock.release")``."""

    name: str
    """Unique within the saga."""
    action: str
    """The action (AMQP routing key) that executes the step, e.g. ``"orders.create"``."""
    compensation: str | None = None
    """The action that undoes the step; None when there is nothing to undo."""
    input: Mapping[str, Any] | None = None
    """The JSON object handed to the action."""
    retry_policy: RetryPolicy | None = None
    """How the action is retried (None: the saga's policy)."""
    compensation_retry_policy: RetryPolicy | None = None
    """How the compensation is retried (None: the saga's compensation policy)."""
    timeout: Seconds | None = None
    """Each attempt's time limit (None: the saga's ``step_timeout``)."""
    depends_on: Sequence[str] | None = None
    """Names of the steps this one waits for; None: the step before it; ``()``: none
    (it starts with the saga). Steps whose dependencies are done run at the same time."""
    when: str | None = None
    """A CEL condition over ``context`` and ``steps.<name>.output``; false skips the step
    (e.g. ``"context.gift == true"``)."""

    def to_proto(self, field: str = "input") -> coordinator_pb2.StepSpec:
        """The wire form; InvalidArgument naming ``field`` (and the place in it) for an
        input value JSON cannot carry."""
        spec = coordinator_pb2.StepSpec(
            name=self.name,
            action=self.action,
            compensation=self.compensation or "",
            input=_json(self.input, field),
        )
        if self.retry_policy is not None:
            spec.retry_policy.CopyFrom(self.retry_policy.to_proto())
        if self.compensation_retry_policy is not None:
            spec.compensation_retry_policy.CopyFrom(self.compensation_retry_policy.to_proto())
        if self.timeout is not None:
            spec.timeout.CopyFrom(_duration("timeout", self.timeout))
        if self.when is not None:
            spec.when = self.when
        if self.depends_on is not None:
            if isinstance(self.depends_on, str):
                raise TypeError("depends_on is a sequence of step names, not one string")
            spec.depends_on.extend(self.depends_on)
            spec.depends_on_nothing = not self.depends_on
        return spec


class Resolution(StrEnum):
    """What :meth:`SagaClient.resolve_compensation` does with a stuck compensation."""

    RETRY = "retry"
    """Try the failed compensation again (after its cause was fixed)."""
    MARK_COMPENSATED = "mark_compensated"
    """Record it as undone (a person undid it by hand) and go on compensating."""

    def to_proto(self) -> coordinator_pb2.CompensationResolution.ValueType:
        """The wire value."""
        return coordinator_pb2.CompensationResolution.Value(f"COMPENSATION_RESOLUTION_{self.name}")


@dataclass(frozen=True)
class StartedSaga:
    """What :meth:`SagaClient.start_saga_reply` answers."""

    saga: Saga
    """The saga, as recorded (for a replay: as it is now)."""
    replayed: bool
    """True when the idempotency key had started this saga before: nothing new began.
    (Also when a try of this same call started it and its answer was lost with the
    coordinator that gave it: the repeat replays it.)"""


@dataclass(frozen=True)
class ActivePage:
    """One page of :meth:`SagaClient.list_active` or :meth:`SagaClient.list_sagas`."""

    sagas: list[Saga]
    next_page_token: str
    """Pass on for the next page; empty on the last one."""


MAX_ANSWER_BYTES = 64 * 1024 * 1024
"""The largest answer the client reads (gRPC's default is 4 MiB)."""


class StartedSagas(list[Saga]):
    """The sagas of :meth:`SagaClient.start_sagas`, in the order asked."""

    def __init__(self, sagas: Iterable[Saga], *, replayed: Iterable[int] = ()) -> None:
        super().__init__(sagas)
        self.replayed = frozenset(replayed)
        """Positions whose saga was started before (an idempotency key used before with
        the same request, or earlier in the same call): an import run again replays."""


class SagaClient:
    """A connection to the coordinator; use ``async with SagaClient(...) as client:``.

    ``target`` (default: ``SAGAPLANE_COORDINATOR``, else :data:`DEFAULT_TARGET`) is
    ``host:port``, or several coordinator replicas as ``ip:port,ip:port,...`` (all IPv4,
    or all IPv6 in brackets), or a gRPC target URI such as
    ``dns:///coordinator.internal:50051`` (every address the name resolves to); a form
    gRPC cannot resolve (a list of host names) raises
    :class:`~sagaplane.errors.ConfigurationError` naming it. Calls are spread over every
    replica whose connection is ready (gRPC's round_robin), so one that dies is left
    out; see :mod:`sagaplane.targets`.

    A call that fails with UNAVAILABLE (its replica died under it, say) is repeated, up
    to :data:`~sagaplane.targets.RETRY_ATTEMPTS` tries in all, only when repeating it
    cannot do anything twice: the reads (GetSaga, ListActive, ListSagas, the opening of
    WatchSaga), Compensate, and a StartSaga or StartSagas whose every saga has an
    idempotency key (repeating it replays the saga the first try may have started). A
    start without a key is not repeated, since it could start a second saga; nor is
    ResolveCompensation. gRPC itself repeats any call that never reached a coordinator.

    Pass ``credentials`` for TLS (:func:`tls_credentials`); ``server_name`` is the name
    the coordinators' certificates are checked against when it is not the target's host
    (needed for a list of replicas with different hosts). ``token`` (default:
    ``SAGAPLANE_TOKEN``) is sent as ``authorization: Bearer <token>`` with every call.
    ``timeout`` is each call's deadline in seconds (None: no deadline). With
    ``wait_for_ready``, a call made while no coordinator is reachable waits (within its
    deadline) for one to come back instead of failing at once. ``options`` are grpc
    channel options (a ``grpc.service_config`` of their own replaces the one above).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 10.0,
        wait_for_ready: bool = False,
        options: Iterable[tuple[str, Any]] = (),
        server_name: str | None = None,
    ) -> None:
        self.target = target or os.environ.get("SAGAPLANE_COORDINATOR") or DEFAULT_TARGET
        """The target as given (what messages name)."""
        # Parsed now, so that a form gRPC cannot resolve is refused where it was given.
        self._target = targets.parse(self.target)
        self._credentials = credentials
        token = token or os.environ.get("SAGAPLANE_TOKEN")
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self._wait_for_ready = wait_for_ready
        # A saga of many steps with large outputs is more than gRPC's default 4 MiB
        # answer (100 outputs of 64 KiB are 6.25 MiB): read up to MAX_ANSWER_BYTES.
        self._options = targets.channel_options(
            self._target,
            tls=credentials is not None,
            server_name=server_name,
            options=[("grpc.max_receive_message_length", MAX_ANSWER_BYTES), *options],
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: coordinator_pb2_grpc.SagaCoordinatorServiceAsyncStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    # -- the channel ------------------------------------------------------------------

    def _connect(self) -> grpc.aio.Channel:
        # Created on first use, inside the running loop that grpc.aio binds the channel to.
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target.uri, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self._target.uri, self._credentials, options=self._options
                )
        return self._channel

    def _service(self) -> coordinator_pb2_grpc.SagaCoordinatorServiceAsyncStub:
        if self._stub is None:
            self._stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(self._connect())
        return self._stub

    async def _call(
        self, call: Callable[..., Awaitable[_R]], request: object, deadline: float | None = None
    ) -> _R:
        try:
            return await call(
                request,
                timeout=self._timeout if deadline is None else deadline,
                # The caller's span, if any, becomes the parent of what the call does
                # (a saga started by it belongs to the caller's trace).
                metadata=self._metadata + tracing.outgoing(),
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def _start_call(
        self, call: Callable[..., Awaitable[_R]], request: object, *, keyed: bool
    ) -> _R:
        """A StartSaga or StartSagas call, repeated on UNAVAILABLE when ``keyed`` (every
        saga has an idempotency key: a repeat replays what the lost try started).

        gRPC's retry policy is chosen per method, not per request, so it cannot tell a
        keyed start from one without a key: these repeats are this client's own, as many
        as gRPC makes of the reads (:data:`~sagaplane.targets.RETRY_ATTEMPTS`).
        """
        failures = 0
        while True:
            try:
                return await self._call(call, request)
            except CoordinatorUnavailable as exc:
                failures += 1
                # DEADLINE_EXCEEDED maps to CoordinatorUnavailable too; a call that used
                # its whole deadline is not repeated past it.
                unavailable = exc.code is grpc.StatusCode.UNAVAILABLE
                if not keyed or not unavailable or failures >= targets.RETRY_ATTEMPTS:
                    raise
            await asyncio.sleep(backoff.delay(failures, initial=0.05, maximum=1.0))

    # -- starting ---------------------------------------------------------------------

    async def start_saga(
        self,
        name: str,
        steps: Iterable[StepSpec | Mapping[str, Any]],
        *,
        context: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        retry_policy: RetryPolicy | None = None,
        compensation_retry_policy: RetryPolicy | None = None,
        step_timeout: Seconds | None = None,
        timeout: Seconds | None = None,  # noqa: ASYNC109  (the saga's own time limit, not this call's)
    ) -> Saga:
        """Start a saga; its first step is dispatched at once.

        ``steps`` are :class:`StepSpec` or dicts with the same keys. With an
        ``idempotency_key``, repeating the same call returns the saga already started
        (a different request with that key raises ``IdempotencyConflict``), so the client
        repeats it by itself when a coordinator is lost under it; without a key, a lost
        answer raises CoordinatorUnavailable and the saga may or may not have started.
        ``retry_policy`` and ``compensation_retry_policy`` apply to every step that does
        not set its own; ``step_timeout`` limits each attempt of such a step;
        ``timeout`` limits the whole saga (it is compensated when it passes).
        """
        request = saga_request(
            name,
            steps,
            context=context,
            idempotency_key=idempotency_key,
            retry_policy=retry_policy,
            compensation_retry_policy=compensation_retry_policy,
            step_timeout=step_timeout,
            timeout=timeout,
        )
        return await self.start_saga_request(request)

    async def start_saga_request(
        self, request: coordinator_pb2.StartSagaRequest | Mapping[str, Any]
    ) -> Saga:
        """Start a saga from a whole StartSaga request: the protobuf, or its JSON form
        (the fields as ``grpcurl -d`` takes them, e.g. a saga file). A JSON form that
        does not fit the request raises :class:`~sagaplane.errors.InvalidArgument`."""
        return (await self.start_saga_reply(request)).saga

    async def start_saga_reply(
        self, request: coordinator_pb2.StartSagaRequest | Mapping[str, Any]
    ) -> StartedSaga:
        """As :meth:`start_saga_request`, and whether the saga was already there: with an
        idempotency key used before, nothing new is started (``replayed``)."""
        if not isinstance(request, coordinator_pb2.StartSagaRequest):
            request = parse_start_request(request)
        keyed = bool(request.idempotency_key)
        response = await self._start_call(self._service().StartSaga, request, keyed=keyed)
        return StartedSaga(saga=Saga.from_proto(response.saga), replayed=response.replayed)

    async def start_sagas(
        self, requests: Iterable[coordinator_pb2.StartSagaRequest | Mapping[str, Any]]
    ) -> StartedSagas:
        """Start up to 1000 sagas in one call and one transaction: all of them, or none.

        ``requests`` are StartSaga requests (from :func:`saga_request`) or their JSON
        form. Returns the sagas in the same order (a list; its ``replayed`` says which
        positions were not started by this call); a saga whose idempotency key was used
        before with the same request is the one started then. When any request is bad,
        nothing is started and :class:`~sagaplane.errors.InvalidArgument` is raised, its
        ``.violations`` naming the first bad field of each bad saga
        (``sagas[17].steps[0].action``, ``.index`` 17); a key used before for a
        different request raises ``IdempotencyConflict``, with the same ``.violations``.
        """
        batch = coordinator_pb2.StartSagasRequest()
        violations: list[FieldViolation] = []
        for i, request in enumerate(requests):
            if isinstance(request, coordinator_pb2.StartSagaRequest):
                batch.sagas.append(request)
                continue
            try:
                batch.sagas.append(parse_start_request(request))
            except InvalidArgument as exc:
                violations.append(FieldViolation(f"sagas[{i}]", exc.message))
        if violations:
            raise InvalidArgument("; ".join(map(str, violations)), violations=tuple(violations))
        keyed = all(s.idempotency_key for s in batch.sagas)
        response = await self._start_call(self._service().StartSagas, batch, keyed=keyed)
        return StartedSagas(
            (Saga.from_proto(s) for s in response.sagas), replayed=response.replayed
        )

    # -- reading ----------------------------------------------------------------------

    async def get_saga(self, saga_id: str, *, include_history: bool = False) -> Saga:
        """One saga; with its transitions when ``include_history``. Raises SagaNotFound."""
        request = coordinator_pb2.GetSagaRequest(id=saga_id, include_history=include_history)
        response = await self._call(self._service().GetSaga, request)
        return Saga.from_proto(response.saga)

    async def list_active(
        self,
        page_size: int = 0,
        page_token: str = "",
        name: str = "",
        *,
        stale_for: Seconds | None = None,
    ) -> ActivePage:
        """One page of active sagas, newest first; pass ``next_page_token`` on for more.

        ``name`` keeps sagas of that name only; ``stale_for`` those whose last
        transition is at least that old (stuck ones). ``page_size`` 0: the server's.
        """
        request = coordinator_pb2.ListActiveRequest(
            page_size=page_size, page_token=page_token, name=name
        )
        if stale_for is not None:
            request.stale_for.CopyFrom(_duration("stale_for", stale_for))
        response = await self._call(self._service().ListActive, request)
        return ActivePage(
            sagas=[Saga.from_proto(s) for s in response.sagas],
            next_page_token=response.next_page_token,
        )

    async def iter_active(
        self, *, name: str = "", page_size: int = 0, stale_for: Seconds | None = None
    ) -> AsyncIterator[Saga]:
        """Every active saga, page after page."""
        token = ""
        while True:
            page = await self.list_active(page_size, token, name, stale_for=stale_for)
            for saga in page.sagas:
                yield saga
            token = page.next_page_token
            if not token:
                return

    async def list_sagas(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        states: Iterable[SagaState | str] = (),
        name: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        id: str = "",
        idempotency_key: str = "",
    ) -> ActivePage:
        """One page of every saga, finished ones too, newest first (ListSagas); pass
        ``next_page_token`` on, with the same filters, for more.

        ``states`` keeps sagas in one of them (e.g. ``["failed", "compensated"]``);
        ``created_after`` (inclusive) and ``created_before`` (exclusive) bound the start
        time (aware datetimes); ``id`` or ``idempotency_key`` find one saga.
        """
        request = coordinator_pb2.ListSagasRequest(
            page_size=page_size,
            page_token=page_token,
            name=name,
            id=id,
            idempotency_key=idempotency_key,
        )
        for i, state in enumerate(states):
            try:
                request.states.append(SagaState(state).to_proto())
            except ValueError:
                raise InvalidArgument(
                    f"states[{i}]: must be one of {', '.join(SagaState)}, not {state!r}"
                ) from None
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        response = await self._call(self._service().ListSagas, request)
        return ActivePage(
            sagas=[Saga.from_proto(s) for s in response.sagas],
            next_page_token=response.next_page_token,
        )

    async def iter_sagas(
        self,
        *,
        page_size: int = 0,
        states: Iterable[SagaState | str] = (),
        name: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> AsyncIterator[Saga]:
        """Every saga matching the filters (see :meth:`list_sagas`), page after page."""
        wanted = list(states)
        token = ""
        while True:
            page = await self.list_sagas(
                page_size,
                token,
                states=wanted,
                name=name,
                created_after=created_after,
                created_before=created_before,
            )
            for saga in page.sagas:
                yield saga
            token = page.next_page_token
            if not token:
                return

    # -- changing ---------------------------------------------------------------------

    async def compensate(self, saga_id: str, reason: str = "") -> Saga:
        """Undo every completed step of the saga, newest first (idempotent)."""
        request = coordinator_pb2.CompensateRequest(id=saga_id, reason=reason)
        response = await self._call(self._service().Compensate, request)
        return Saga.from_proto(response.saga)

    async def resolve_compensation(
        self, saga_id: str, resolution: Resolution | str, reason: str
    ) -> Saga:
        """Decide about a saga in ``compensation_failed``: retry the failed compensation,
        or mark it compensated (``reason``, required, is recorded in the history)."""
        try:
            chosen = Resolution(resolution)
        except ValueError:
            raise InvalidArgument(
                f"resolution: must be one of {', '.join(Resolution)}, not {resolution!r}"
            ) from None
        request = coordinator_pb2.ResolveCompensationRequest(
            id=saga_id, resolution=chosen.to_proto(), reason=reason
        )
        response = await self._call(self._service().ResolveCompensation, request)
        return Saga.from_proto(response.saga)

    # -- following --------------------------------------------------------------------

    # One deadline for the whole wait is part of its meaning, so it is an argument here.
    async def wait(self, saga_id: str, timeout: float = 30.0) -> Saga:  # noqa: ASYNC109
        """Follow the saga (:meth:`watch`, no polling) until it is in
        :data:`TERMINAL_STATES`, and return it.

        Raises :class:`~sagaplane.errors.WaitTimeout` (a TimeoutError, with ``.saga`` as
        last seen) after ``timeout`` seconds.
        """
        saga: Saga | None = None
        try:
            async with asyncio.timeout(timeout):
                async for seen in self.watch(saga_id, history=False):
                    saga = seen
                    if saga.ended:  # compensation_failed included: it waits for a person
                        break
        except TimeoutError as exc:
            state = saga.state.value if saga is not None else "unknown"
            raise WaitTimeout(
                f"saga {saga_id} is still {state} after {timeout}s", saga=saga
            ) from exc
        assert saga is not None and saga.ended
        return saga

    async def watch(
        self, saga_id: str, *, after_position: int = 0, history: bool = True
    ) -> AsyncIterator[Saga]:
        """The saga now, then again after each commit that changed it, until it ends
        (the WatchSaga stream: the coordinator pushes each transition as it commits).

        Each saga yielded carries in ``history`` every entry received so far (with
        ``history=False``, only those of its own message): the whole history, or
        with ``after_position`` (the ``position`` of the last entry seen, after a lost
        connection) the entries after it, none missed or repeated. The last saga
        yielded is in :data:`TERMINAL_STATES`; a saga in ``compensation_failed`` is
        followed on (it waits for a person). Bound the whole watch with
        ``asyncio.timeout`` if needed. A watcher that reads too slowly is cut off by
        the coordinator with :class:`~sagaplane.errors.ResourceExhausted`.
        """
        request = coordinator_pb2.WatchSagaRequest(id=saga_id, after_position=after_position)
        seen: list[saga_pb2.HistoryEntry] = []
        call = self._service().WatchSaga(
            request, metadata=self._metadata, wait_for_ready=self._wait_for_ready
        )
        try:
            async for message in call:
                saga = saga_pb2.Saga()
                saga.CopyFrom(message.saga)
                if history:
                    seen += message.history
                    saga.history.extend(seen)
                else:
                    saga.history.extend(message.history)
                yield Saga.from_proto(saga)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()

    # -- the process ------------------------------------------------------------------

    async def health(self, service: str = "", *, deadline: float | None = None) -> str:
        """The gRPC health status (``"SERVING"``, ``"NOT_SERVING"``, ...) of the server,
        or of one of its services by full name; ``deadline`` (seconds) overrides the client's."""
        if self._health is None:
            self._health = health_pb2_grpc.HealthStub(self._connect())
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._call(self._health.Check, request, deadline)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def wait_until_serving(
        self, within: float = 30.0, *, poll: float = 0.05, alive: Callable[[], None] | None = None
    ) -> None:
        """Until :meth:`health` says SERVING; TimeoutError after ``within`` seconds.

        What a caller that just started a coordinator waits for: errors in between
        count as "not yet". ``alive`` is called before each try and may raise (e.g.
        when the process being waited for has exited).
        """
        async with asyncio.timeout(within):
            while True:
                if alive is not None:
                    alive()
                try:
                    if await self.health(deadline=1.0) == "SERVING":
                        return
                except CoordinatorError:
                    pass
                await asyncio.sleep(poll)

    def with_token(self, token: str | None) -> SagaClient:
        """A client on this one's connection that sends ``token`` (None: no token at all)
        with every call instead of this client's own: for a server that calls the
        coordinator on behalf of its own callers, each with their credentials (the web
        page). Cheap; close only the original (closing either closes the connection)."""
        self._service()  # connected first, so that the clone shares the channel and stubs
        clone = copy.copy(self)
        clone._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return clone

    async def close(self) -> None:
        """Close the channel; safe to call twice. Calls in flight are cancelled."""
        channel, self._channel, self._stub, self._health = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def tls_credentials(
    ca: str | os.PathLike[str] | None = None,
    *,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for :class:`SagaClient` from PEM files (read now, blocking): the
    CA that signed the coordinator's certificate (None: the system's roots), and for
    mTLS this client's certificate and key."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together: give both, or neither")

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


def saga_request(
    name: str,
    steps: Iterable[StepSpec | Mapping[str, Any]],
    *,
    context: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    retry_policy: RetryPolicy | None = None,
    compensation_retry_policy: RetryPolicy | None = None,
    step_timeout: Seconds | None = None,
    timeout: Seconds | None = None,
) -> coordinator_pb2.StartSagaRequest:
    """The StartSaga request of :meth:`SagaClient.start_saga`'s arguments (one of the
    sagas to give :meth:`SagaClient.start_sagas`)."""
    request = coordinator_pb2.StartSagaRequest(
        name=name,
        steps=[_step(s, f"steps[{i}].input") for i, s in enumerate(steps)],
        context=_json(context, "context"),
        idempotency_key=idempotency_key or "",
    )
    if retry_policy is not None:
        request.retry_policy.CopyFrom(retry_policy.to_proto())
    if compensation_retry_policy is not None:
        request.compensation_retry_policy.CopyFrom(compensation_retry_policy.to_proto())
    if step_timeout is not None:
        request.step_timeout.CopyFrom(_duration("step_timeout", step_timeout))
    if timeout is not None:
        request.timeout.CopyFrom(_duration("timeout", timeout))
    return request


def parse_start_request(data: Mapping[str, Any]) -> coordinator_pb2.StartSagaRequest:
    """The StartSaga request of its JSON form; InvalidArgument naming what does not fit.

    Field names are the proto's (``step_timeout``; protobuf's camelCase works too), and
    durations take the forms people write (``10s``, ``1m30s``, ``10 seconds``, a number
    of seconds): see :mod:`sagaplane.jsonform`.
    """
    request = coordinator_pb2.StartSagaRequest()
    prepared = jsonform.prepare(data, request.DESCRIPTOR)
    try:
        return json_format.ParseDict(prepared, request)
    except json_format.ParseError as exc:
        raise InvalidArgument(str(exc)) from exc


def _duration(field: str, value: Seconds) -> Any:
    try:
        return to_duration(value)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def _json(value: Mapping[str, Any] | None, field: str) -> Any:
    try:
        return structs.encode(value, field)
    except structs.InvalidJson as exc:
        raise InvalidArgument(str(exc)) from None


def _step(spec: StepSpec | Mapping[str, Any], field: str = "input") -> coordinator_pb2.StepSpec:
    if isinstance(spec, StepSpec):
        return spec.to_proto(field)
    unknown = set(spec) - set(StepSpec.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown step keys: {', '.join(sorted(unknown))}")
    return StepSpec(**spec).to_proto(field)
