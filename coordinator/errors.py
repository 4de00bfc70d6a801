"""The coordinator's errors; the API maps each to one gRPC status code.

    ServiceError            the coordinator cannot do what was asked
     ├── BadRequest         INVALID_ARGUMENT     a field is invalid; names the field
     ├── UnknownSaga        NOT_FOUND            no saga has this (or a malformed) id
     ├── KeyReused          ALREADY_EXISTS       key already used for another request
     └── StorageUnavailable UNAVAILABLE          the database cannot be reached; retry
    engine.WrongState       FAILED_PRECONDITION  not allowed in the saga's current state

The names say what the server refuses, and differ from the SDK's
(``sagaplane.errors``), whose names are public API and describe the same refusals as
a client receives them: ``BadRequest`` arrives as ``InvalidArgument``, ``UnknownSaga``
as ``SagaNotFound``, ``KeyReused`` as ``IdempotencyConflict`` and ``WrongState`` as
``IllegalTransition``. One name per class across both packages keeps a traceback or an
import unambiguous. ``WrongState`` is the engine's (the engine imports nothing from
here), so it is not a ServiceError; :data:`Refusal` names both.

Each class's docstring is its default message.
"""

from __future__ import annotations

from coordinator.engine.errors import WrongState

__all__ = [
    "BadRequest",
    "KeyReused",
    "Refusal",
    "ServiceError",
    "StorageUnavailable",
    "UnknownSaga",
]


class ServiceError(Exception):
    """The coordinator cannot do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class BadRequest(ServiceError):
    """The request is invalid."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownSaga(ServiceError):
    """No saga has this id."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(f"saga {saga_id!r} not found")
        self.saga_id = saga_id


class KeyReused(ServiceError):
    """The idempotency key was already used for a different request."""


class StorageUnavailable(ServiceError):
    """The database cannot be reached right now; retry later."""


Refusal = ServiceError | WrongState
"""Every error the API maps to a status code of its own."""
