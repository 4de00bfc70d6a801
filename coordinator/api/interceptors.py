"""The coordinator's refusals (coordinator.errors) -> gRPC status codes, in one place;
internals never leak.

A refusal about fields (:attr:`~coordinator.errors.ServiceError.violations`) also carries
them as ``google.rpc.BadRequest`` field violations in the status details (the
``grpc-status-details-bin`` trailer of the rich error model), so that a client in any
language can show them one by one. Trailers are small (gRPC clients refuse more than
8 KiB of them by default), so the message and the details hold what fits their budgets
and then say how many more there are.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from coordinator import errors
from coordinator.engine import WrongState

log = logging.getLogger(__name__)

_CODES: dict[type[errors.Refusal], grpc.StatusCode] = {
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownSaga: grpc.StatusCode.NOT_FOUND,
    errors.KeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.SlowWatcher: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: errors.Refusal) -> grpc.StatusCode:
    """The status code of a refusal (INTERNAL for one not in the table)."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


MAX_MESSAGE = 1000
"""Characters of a status message listing violations (then "; and N more")."""
MAX_DETAILS = 3000
"""Bytes of field violations in the details (then one saying how many more)."""
MAX_PART = 300
"""Characters of one violation's field, and of its problem (a field's path can hold a
JSON key of any length)."""


def rich_status(code: grpc.StatusCode, violations: Sequence[errors.Violation]) -> grpc.Status:
    """The status of a refusal about ``violations``: a message naming them, and the
    same as ``google.rpc.BadRequest`` details, each within its budget."""
    cut = [
        errors.Violation(field=_shorten(v.field, MAX_PART), problem=_shorten(v.problem, MAX_PART))
        for v in violations
    ]
    message = ""
    for n, v in enumerate(cut):
        part = f"{'; ' if message else ''}{v}"
        if n and len(message) + len(part) > MAX_MESSAGE:
            message += f"; and {len(cut) - n} more"
            break
        message += part
    bad = error_details_pb2.BadRequest()
    for n, v in enumerate(cut):
        if n and bad.ByteSize() + len(v.field) + len(v.problem) + 8 > MAX_DETAILS:
            # A violation of the list itself, so that a client listing them per row
            # still shows that some are missing.
            bad.field_violations.add(
                field=v.field.split("[", 1)[0].split(".", 1)[0],
                description=f"and {len(cut) - n} more not listed here (the answer is limited)",
            )
            break
        bad.field_violations.add(field=v.field, description=v.problem)
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(bad)
    return cast(grpc.Status, rpc_status.to_status(status))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _UndecodableRequest:
    """Stands in for a request protobuf could not parse (e.g. nested past its depth limit)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # gRPC would answer a decode failure with UNKNOWN; a bad request deserves INVALID_ARGUMENT.
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _UndecodableRequest(exc)

    return parse


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns a refusal (see coordinator.errors) into its status code, and anything else
    into a logged INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # A unary call returns its answer; a server-streaming one (WatchSaga) writes its
        # messages with context.write and returns None: both are awaited the same way.
        inner = cast(
            Callable[[Any, grpc.ServicerContext], Awaitable[Any]] | None,
            handler.unary_unary or handler.unary_stream,
        )
        if inner is None:
            return handler
        method = handler_call_details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if isinstance(request, _UndecodableRequest):
                    raise errors.BadRequest(
                        "request", f"cannot be decoded (JSON nested too deep?): {request.error}"
                    )
                return await inner(request, cast(grpc.ServicerContext, context))
            except errors.ServiceError as exc:
                if exc.violations:
                    status = rich_status(status_for(exc), exc.violations)
                    await context.abort(
                        status.code, status.details, trailing_metadata=status.trailing_metadata
                    )
                await context.abort(status_for(exc), str(exc))
            except WrongState as exc:
                await context.abort(status_for(exc), str(exc))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.unary_stream_rpc_method_handler
        )
        return make(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
