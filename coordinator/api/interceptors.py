"""The coordinator's refusals (coordinator.errors) -> gRPC status codes, in one place;
internals never leak."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc

from coordinator import errors
from coordinator.engine import WrongState

log = logging.getLogger(__name__)

_CODES: dict[type[errors.Refusal], grpc.StatusCode] = {
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownSaga: grpc.StatusCode.NOT_FOUND,
    errors.KeyReused: grpc.StatusCode.ALREADY_EXISTS,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: errors.Refusal) -> grpc.StatusCode:
    """The status code of a refusal (INTERNAL for one not in the table)."""
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


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
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _UndecodableRequest):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request: cannot be decoded (JSON nested too deep?): {request.error}",
                )
            try:
                return await inner(request, cast(grpc.ServicerContext, context))
            except (errors.ServiceError, WrongState) as exc:
                await context.abort(status_for(exc), str(exc))
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
