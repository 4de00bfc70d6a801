"""The SagaCoordinatorService implementation: validate, call the store, convert."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from coordinator import engine, tracing
from coordinator.api import auth, convert, validation
from coordinator.api.page_tokens import PageTokens
from coordinator.errors import BadRequest, KeyReused, SlowWatcher
from coordinator.store.notifications import Listener
from coordinator.store.repository import SagaStore, Started
from sagaplane import logs
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc, saga_pb2

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

MAX_RESPONSE_BYTES = 3 * 1024 * 1024
"""GetSaga's answer stays below this, so that it fits a gRPC client's default 4 MiB (a
saga's own limits keep it far below; only a long history can reach it)."""
MAX_BATCH_RESPONSE_BYTES = 3 * 1024 * 1024
"""StartSagas' answer stays below this (a gRPC client's default limit is 4 MiB); a batch
whose sagas would not fit is refused before anything is committed."""
MAX_PAGE_BYTES = 3 * 1024 * 1024
"""A ListActive page ends before the saga that would take it past this size (it always
holds at least one saga), so that it stays under a gRPC client's default 4 MiB."""


WATCH_SEND_TIMEOUT = 30.0
"""Seconds a WatchSaga message may wait for its client to take it (HTTP/2 flow control
holds it while the client reads nothing) before the watcher is cut off."""

FINAL_STATES = frozenset(
    {engine.SagaState.COMPLETED, engine.SagaState.FAILED, engine.SagaState.COMPENSATED}
)
"""WatchSaga ends after showing one of these (COMPENSATION_FAILED waits for a person)."""


class SagaCoordinatorServicer(coordinator_pb2_grpc.SagaCoordinatorServiceServicer):
    """Serves the gRPC API from the saga store. Errors are mapped by the interceptor.

    WatchSaga's wake-ups come from ``listener``; a message its client has not taken
    within ``watch_send_timeout`` seconds cuts the watcher off (RESOURCE_EXHAUSTED).
    """

    def __init__(
        self,
        store: SagaStore,
        page_tokens: PageTokens,
        listener: Listener,
        *,
        watch_send_timeout: float = WATCH_SEND_TIMEOUT,
    ) -> None:
        self._store = store
        self._page_tokens = page_tokens
        self._listener = listener
        self._watch_send_timeout = watch_send_timeout

    async def StartSaga(
        self, request: coordinator_pb2.StartSagaRequest, context: Context
    ) -> coordinator_pb2.StartSagaResponse:
        """Record a saga and dispatch its first step (idempotent with a key)."""
        spec = validation.start_request(request)
        started = await self._store.start(
            spec,
            request=validation.canonical(request),
            trace=tracing.saga_context(context),
            caller=auth.caller(),
        )
        if started.created:
            log.info(
                "saga %s started (%s, %d steps)",
                started.saga.id,
                spec.name,
                len(spec.steps),
                extra=logs.fields(started.saga.id),
            )
        return coordinator_pb2.StartSagaResponse(
            saga=convert.saga_to_proto(started.saga), replayed=not started.created
        )

    async def StartSagas(
        self, request: coordinator_pb2.StartSagasRequest, context: Context
    ) -> coordinator_pb2.StartSagasResponse:
        """Record many sagas in one transaction, all or none, and dispatch their first steps."""
        specs, requests = validation.start_requests(request)
        response = coordinator_pb2.StartSagasResponse()

        def fits(outcomes: Sequence[Started]) -> None:
            # Converted once, before the commit: an answer too large for the client would
            # otherwise arrive as an error after the sagas were started.
            response.sagas.extend(convert.saga_to_proto(o.saga) for o in outcomes)
            size = response.ByteSize()
            if size > MAX_BATCH_RESPONSE_BYTES:
                raise BadRequest(
                    "sagas",
                    f"the answer (every saga as recorded) would be {size} bytes, more than "
                    f"{MAX_BATCH_RESPONSE_BYTES}; send fewer sagas per call",
                )

        try:
            started = await self._store.start_many(
                specs,
                requests=requests,
                accept=fits,
                trace=tracing.saga_context(context),
                caller=auth.caller(),
            )
        except KeyReused as exc:
            raise KeyReused(violations=[v.under("sagas") for v in exc.violations]) from None
        response.replayed.extend(i for i, o in enumerate(started) if not o.created)
        created = sum(o.created for o in started)
        if created:
            log.info("%d sagas started in one batch (%d replayed)", created, len(started) - created)
        return response

    async def GetSaga(
        self, request: coordinator_pb2.GetSagaRequest, context: Context
    ) -> coordinator_pb2.GetSagaResponse:
        """Return one saga, with its history when asked."""
        saga, history = await self._store.get(
            validation.saga_id(request.id), history=request.include_history
        )
        message = convert.saga_to_proto(saga, history)
        fit_history(message, MAX_RESPONSE_BYTES)
        return coordinator_pb2.GetSagaResponse(saga=message)

    async def Compensate(
        self, request: coordinator_pb2.CompensateRequest, context: Context
    ) -> coordinator_pb2.CompensateResponse:
        """Undo the saga's completed steps; a no-op when it is already being undone."""
        transition = await self._store.apply(
            validation.saga_id(request.id),
            engine.CompensateRequested(reason=validation.reason(request.reason)),
            caller=auth.caller(),
        )
        return coordinator_pb2.CompensateResponse(saga=convert.saga_to_proto(transition.saga))

    async def ListActive(
        self, request: coordinator_pb2.ListActiveRequest, context: Context
    ) -> coordinator_pb2.ListActiveResponse:
        """Active sagas, newest first, one page at a time."""
        limit = validation.page_size(request.page_size)
        name = validation.name_filter(request.name)
        after = self._page_tokens.decode(request.page_token, name)
        # One extra row tells whether another page exists without a second query.
        sagas = await self._store.list_active(
            limit=limit + 1,
            after=after,
            name=name or None,
            stale_for=validation.stale_for(request),
        )
        page = _page(sagas, limit)
        token = ""
        if len(page) < len(sagas):
            token = self._page_tokens.encode(page[-1].id, name)
        return coordinator_pb2.ListActiveResponse(sagas=page, next_page_token=token)

    async def ListSagas(
        self, request: coordinator_pb2.ListSagasRequest, context: Context
    ) -> coordinator_pb2.ListSagasResponse:
        """Every saga (finished ones too) matching the filters, newest first, one page
        at a time."""
        limit = validation.page_size(request.page_size)
        kept = validation.list_filter(request)
        digest = validation.filter_digest(kept)
        position = self._page_tokens.position(
            request.page_token, digest, listing="ListSagas", filters="different filters"
        )
        after, after_created = position if position is not None else (None, None)
        sagas = await self._store.list_sagas(
            limit=limit + 1, after=after, after_created=after_created, filters=kept
        )
        page = _page(sagas, limit)
        token = ""
        if len(page) < len(sagas):
            last = sagas[len(page) - 1]
            token = self._page_tokens.encode(last.id, digest, created_at=last.created_at)
        return coordinator_pb2.ListSagasResponse(sagas=page, next_page_token=token)

    # A coroutine that writes (grpc.aio's other form of a streaming handler), not the
    # generator the stubs declare: each write is awaited under a timeout of its own.
    async def WatchSaga(  # type: ignore[override]
        self, request: coordinator_pb2.WatchSagaRequest, context: Context
    ) -> None:
        """The saga now, then what each commit changed, until the saga ends."""
        saga_id = validation.saga_id(request.id)
        after = validation.after_position(request.after_position)
        # Registered before the first read: a commit after that read always wakes us.
        views = convert.SagaViews()
        with self._listener.watch(saga_id) as changes:
            first = True
            while True:
                # A saga this coordinator just started is remembered (store/recent.py),
                # a transition it committed comes with the wake-up (notifications.py);
                # anything else is read.
                handed = self._recalled(saga_id, after) if first else changes.take(after)
                if handed is not None:
                    saga, entries = handed
                else:
                    saga, entries = await self._store.changes(saga_id, after=after)
                if first or entries:
                    for message in _watch_messages(views.view(saga), entries):
                        await self._send(context, message)
                        if message.history:
                            after = message.history[-1].position
                    first = False
                changes.seen = after
                if saga.state in FINAL_STATES:
                    return
                await changes.wait()

    def _recalled(
        self, saga_id: str, after: int
    ) -> tuple[engine.Saga, list[engine.HistoryEntry]] | None:
        """The saga as its start here left it, with its entries after ``after``; None
        when it is not remembered (or no longer current)."""
        found = self._listener.recent.recall(saga_id)
        if found is None or after > found.position:
            # A watcher resuming from further on (it read another replica's stream) has
            # seen more than the start: what it lacks is read.
            return None
        return found.saga, [e for e in found.entries if e.position > after]

    async def ResolveCompensation(
        self, request: coordinator_pb2.ResolveCompensationRequest, context: Context
    ) -> coordinator_pb2.ResolveCompensationResponse:
        """Retry a failed compensation now, or record that a person undid the step."""
        event = engine.CompensationResolved(
            resolution=validation.resolution(request.resolution),
            reason=validation.required_reason(request.reason),
        )
        transition = await self._store.apply(
            validation.saga_id(request.id), event, caller=auth.caller()
        )
        log.warning(
            "saga %s compensation resolved (%s): %s", request.id, event.resolution, event.reason
        )
        return coordinator_pb2.ResolveCompensationResponse(
            saga=convert.saga_to_proto(transition.saga)
        )

    async def _send(self, context: Context, message: coordinator_pb2.WatchSagaResponse) -> None:
        # The write is not cancelled when it takes too long: gRPC cannot send a status
        # once a write was cancelled under it. The status goes out behind the message
        # (HTTP/2 keeps the order), so the client finds it as soon as it reads again.
        write = asyncio.ensure_future(context.write(message))
        done, _ = await asyncio.wait({write}, timeout=self._watch_send_timeout)
        if write in done:
            write.result()
            return
        write.add_done_callback(_quiet)
        log.warning("WatchSaga of %s: the client read nothing; cut off", message.saga.id)
        raise SlowWatcher(
            f"this watcher did not read its messages for {self._watch_send_timeout:g}s; "
            "call WatchSaga again with after_position set to the last entry received"
        )


def _quiet(task: asyncio.Future[None]) -> None:
    # A write left behind when its watcher was cut off: its outcome no longer matters.
    if not task.cancelled():
        task.exception()


def _page(sagas: Sequence[engine.Saga], limit: int) -> list[saga_pb2.Saga]:
    """The first ``limit`` sagas as a page, ending before the one that would take it past
    MAX_PAGE_BYTES (it always holds at least one saga)."""
    page: list[saga_pb2.Saga] = []
    size = 0
    for saga in sagas[:limit]:
        message = convert.saga_to_proto(saga)
        size += message.ByteSize()
        if page and size > MAX_PAGE_BYTES:
            break
        page.append(message)
    return page


def _watch_messages(
    wire: saga_pb2.Saga, entries: Sequence[engine.HistoryEntry]
) -> Iterator[coordinator_pb2.WatchSagaResponse]:
    """The saga ``wire`` with ``entries``, in as many messages as needed to keep each one
    below MAX_RESPONSE_BYTES (only a long history in the first message needs more than
    one)."""
    room = MAX_RESPONSE_BYTES - wire.ByteSize()
    message = coordinator_pb2.WatchSagaResponse(saga=wire)
    size = 0
    for entry in entries:
        proto = convert.history_to_proto(entry)
        cost = _field_size(proto)
        if message.history and size + cost > room:
            yield message
            message = coordinator_pb2.WatchSagaResponse(saga=wire)
            size = 0
        message.history.append(proto)
        size += cost
    yield message


def fit_history(saga: saga_pb2.Saga, budget: int) -> None:
    """Cut ``saga.history`` so that the saga fits in ``budget`` bytes.

    A history can grow without end (every retry, every ResolveCompensation adds to it):
    the first entry (``saga_started``) and the newest that fit are kept, and between them
    an entry ``history_truncated`` says how many were left out.
    """
    if saga.ByteSize() <= budget or len(saga.history) < 3:
        return
    entries = list(saga.history)
    first, rest = entries[0], entries[1:]
    del saga.history[:]
    # An entry costs its size, its tag and its length; 256 bytes stay for the marker.
    room = budget - saga.ByteSize() - _field_size(first) - 256
    kept: list[saga_pb2.HistoryEntry] = []
    for entry in reversed(rest):
        room -= _field_size(entry)
        if room < 0:
            break
        kept.append(entry)
    kept.reverse()
    marker = saga_pb2.HistoryEntry(
        from_state=first.to_state,
        to_state=kept[0].from_state if kept else saga.state,
        event="history_truncated",
        reason=f"{len(rest) - len(kept)} older entries left out of this answer to fit its size",
        at=kept[0].at if kept else first.at,
    )
    saga.history.extend([first, marker, *kept])


def _field_size(entry: saga_pb2.HistoryEntry) -> int:
    size = entry.ByteSize()
    return 1 + (size.bit_length() + 6) // 7 + size
