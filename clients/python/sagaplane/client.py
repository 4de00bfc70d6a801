"""A typed asyncio client for the coordinator's gRPC API.

Methods return the protobuf messages of ``sagaplane.v1`` (:class:`Saga` is
``sagaplane.v1.saga_pb2.Saga``): they are already typed, print readably, and are what
every other language sees. Convert a Struct field with :func:`sagaplane.structs.to_dict`.
Failed calls raise a :class:`~sagaplane.errors.CoordinatorError` subclass chosen by the
gRPC status code (e.g. :class:`~sagaplane.errors.SagaNotFound`), with the original
``grpc.aio.AioRpcError`` as its ``__cause__``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from sagaplane import defaults, structs
from sagaplane.errors import WaitTimeout, from_rpc_error
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc, saga_pb2

__all__ = ["DEFAULT_TARGET", "TERMINAL_STATES", "Saga", "SagaClient", "SagaState", "StepSpec"]

DEFAULT_TARGET = defaults.COORDINATOR_ADDRESS
"""Where the coordinator listens unless ``SAGAPLANE_COORDINATOR`` says otherwise."""

Saga = saga_pb2.Saga
SagaState = saga_pb2.SagaState

TERMINAL_STATES: frozenset[saga_pb2.SagaState.ValueType] = frozenset(
    {
        saga_pb2.SAGA_STATE_COMPLETED,
        saga_pb2.SAGA_STATE_FAILED,
        saga_pb2.SAGA_STATE_COMPENSATED,
        # Not finished, but nothing more happens without a person: waiting longer is pointless.
        saga_pb2.SAGA_STATE_COMPENSATION_FAILED,
    }
)
"""The states :meth:`SagaClient.wait` returns on."""

_R = TypeVar("_R")


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

    def to_proto(self) -> coordinator_pb2.StepSpec:
        """The wire form."""
        return coordinator_pb2.StepSpec(
            name=self.name,
            action=self.action,
            compensation=self.compensation or "",
            input=structs.to_struct(dict(self.input) if self.input else None),
        )


class SagaClient:
    """A connection to the coordinator; use ``async with SagaClient(...) as client:``.

    ``target`` is ``host:port`` (default: ``SAGAPLANE_COORDINATOR``, else
    :data:`DEFAULT_TARGET`). Pass ``credentials`` for TLS and ``token`` to send
    ``authorization: Bearer <token>`` with every call. ``timeout`` is each call's
    deadline in seconds (None: no deadline).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 10.0,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.target = target or os.environ.get("SAGAPLANE_COORDINATOR") or DEFAULT_TARGET
        self._credentials = credentials
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self._options = list(options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: coordinator_pb2_grpc.SagaCoordinatorServiceAsyncStub | None = None

    def _service(self) -> coordinator_pb2_grpc.SagaCoordinatorServiceAsyncStub:
        # Created on first use, inside the running loop that grpc.aio binds the channel to.
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            self._stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def _call(self, call: Callable[..., Awaitable[_R]], request: object) -> _R:
        try:
            return await call(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def start_saga(
        self,
        name: str,
        steps: Iterable[StepSpec | Mapping[str, Any]],
        *,
        context: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Saga:
        """Start a saga; its first step is dispatched at once.

        ``steps`` are :class:`StepSpec` or dicts with the same keys. With an
        ``idempotency_key``, repeating the same call returns the saga already started
        (a different request with that key raises ``IdempotencyConflict``).
        """
        request = coordinator_pb2.StartSagaRequest(
            name=name,
            steps=[_step(s) for s in steps],
            context=structs.to_struct(dict(context) if context else None),
            idempotency_key=idempotency_key or "",
        )
        response = await self._call(self._service().StartSaga, request)
        return response.saga

    async def get_saga(self, saga_id: str, *, include_history: bool = False) -> Saga:
        """One saga; with its transitions when ``include_history``. Raises SagaNotFound."""
        request = coordinator_pb2.GetSagaRequest(id=saga_id, include_history=include_history)
        response = await self._call(self._service().GetSaga, request)
        return response.saga

    async def compensate(self, saga_id: str, reason: str = "") -> Saga:
        """Undo every completed step of the saga, newest first (idempotent)."""
        request = coordinator_pb2.CompensateRequest(id=saga_id, reason=reason)
        response = await self._call(self._service().Compensate, request)
        return response.saga

    async def list_active(
        self, page_size: int = 0, page_token: str = "", name: str = ""
    ) -> coordinator_pb2.ListActiveResponse:
        """One page of active sagas, newest first; pass ``next_page_token`` on for more."""
        request = coordinator_pb2.ListActiveRequest(
            page_size=page_size, page_token=page_token, name=name
        )
        return await self._call(self._service().ListActive, request)

    async def iter_active(self, *, name: str = "", page_size: int = 0) -> AsyncIterator[Saga]:
        """Every active saga, page after page."""
        token = ""
        while True:
            page = await self.list_active(page_size=page_size, page_token=token, name=name)
            for saga in page.sagas:
                yield saga
            token = page.next_page_token
            if not token:
                return

    # One deadline for the whole wait is part of its meaning, so it is an argument here.
    async def wait(self, saga_id: str, timeout: float = 30.0, poll: float = 0.05) -> Saga:  # noqa: ASYNC109
        """Poll the saga every ``poll`` seconds until it is in :data:`TERMINAL_STATES`.

        Raises :class:`~sagaplane.errors.WaitTimeout` (a TimeoutError, with ``.saga`` as
        last seen) after ``timeout`` seconds.
        """
        saga: Saga | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    saga = await self.get_saga(saga_id)
                    if saga.state in TERMINAL_STATES:
                        return saga
                    await asyncio.sleep(poll)
        except TimeoutError as exc:
            state = saga_pb2.SagaState.Name(saga.state) if saga is not None else "unknown"
            raise WaitTimeout(
                f"saga {saga_id} is still {state} after {timeout}s", saga=saga
            ) from exc

    async def close(self) -> None:
        """Close the channel; safe to call twice. Calls in flight are cancelled."""
        channel, self._channel, self._stub = self._channel, None, None
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


def _step(spec: StepSpec | Mapping[str, Any]) -> coordinator_pb2.StepSpec:
    if isinstance(spec, StepSpec):
        return spec.to_proto()
    unknown = set(spec) - {"name", "action", "compensation", "input"}
    if unknown:
        raise TypeError(f"unknown step keys: {', '.join(sorted(unknown))}")
    return StepSpec(
        name=spec["name"],
        action=spec["action"],
        compensation=spec.get("compensation"),
        input=spec.get("input"),
    ).to_proto()
