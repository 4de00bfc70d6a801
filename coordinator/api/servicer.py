"""The SagaCoordinatorService implementation: validate, call the store, convert."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from coordinator import engine
from coordinator.api import convert, validation
from coordinator.store.repository import SagaStore
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class SagaCoordinatorServicer(coordinator_pb2_grpc.SagaCoordinatorServiceServicer):
    """Serves the gRPC API from the saga store. Errors are mapped by the interceptor."""

    def __init__(self, store: SagaStore) -> None:
        self._store = store

    async def StartSaga(
        self, request: coordinator_pb2.StartSagaRequest, context: Context
    ) -> coordinator_pb2.StartSagaResponse:
        """Record a saga and dispatch its first step (idempotent with a key)."""
        new = validation.start_request(request)
        started = await self._store.start(new)
        if started.created:
            log.info("saga %s started (%s, %d steps)", started.saga.id, new.name, len(new.steps))
        return coordinator_pb2.StartSagaResponse(saga=convert.saga_to_proto(started.saga))

    async def GetSaga(
        self, request: coordinator_pb2.GetSagaRequest, context: Context
    ) -> coordinator_pb2.GetSagaResponse:
        """Return one saga, with its history when asked."""
        saga, history = await self._store.get(
            validation.saga_id(request.id), history=request.include_history
        )
        return coordinator_pb2.GetSagaResponse(saga=convert.saga_to_proto(saga, history))

    async def Compensate(
        self, request: coordinator_pb2.CompensateRequest, context: Context
    ) -> coordinator_pb2.CompensateResponse:
        """Undo the saga's completed steps; a no-op when it is already being undone."""
        transition = await self._store.apply(
            validation.saga_id(request.id),
            engine.CompensateRequested(reason=validation.reason(request.reason)),
        )
        return coordinator_pb2.CompensateResponse(saga=convert.saga_to_proto(transition.saga))

    async def ListActive(
        self, request: coordinator_pb2.ListActiveRequest, context: Context
    ) -> coordinator_pb2.ListActiveResponse:
        """Active sagas, newest first, one page at a time."""
        limit = validation.page_size(request.page_size)
        after = validation.decode_page_token(request.page_token, request.name)
        # One extra row tells whether another page exists without a second query.
        sagas = await self._store.list_active(
            limit=limit + 1,
            after=after,
            name=request.name or None,
            stale_for=validation.stale_for(request),
        )
        token = ""
        if len(sagas) > limit:
            sagas = sagas[:limit]
            token = validation.encode_page_token(sagas[-1].id, request.name)
        return coordinator_pb2.ListActiveResponse(
            sagas=[convert.saga_to_proto(s) for s in sagas], next_page_token=token
        )

    async def ResolveCompensation(
        self, request: coordinator_pb2.ResolveCompensationRequest, context: Context
    ) -> coordinator_pb2.ResolveCompensationResponse:
        """Retry a failed compensation now, or record that a person undid the step."""
        event = engine.CompensationResolved(
            resolution=validation.resolution(request.resolution),
            reason=validation.required_reason(request.reason),
        )
        transition = await self._store.apply(validation.saga_id(request.id), event)
        log.warning(
            "saga %s compensation resolved (%s): %s", request.id, event.resolution, event.reason
        )
        return coordinator_pb2.ResolveCompensationResponse(
            saga=convert.saga_to_proto(transition.saga)
        )
