"""The coordinator's errors; the API maps each to one gRPC status code.

    SagaplaneError
     ├── InvalidArgument       INVALID_ARGUMENT   bad input; names the field
     ├── SagaNotFound          NOT_FOUND          unknown or malformed saga id
     ├── IdempotencyConflict   ALREADY_EXISTS     key reused with another request
     ├── IllegalTransition     FAILED_PRECONDITION not allowed in the saga's state
     └── StorageUnavailable    UNAVAILABLE        the database cannot be reached; retry

Each class's docstring is its default message.
"""

from __future__ import annotations


class SagaplaneError(Exception):
    """Sagaplane failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidArgument(SagaplaneError):
    """The request is invalid."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class SagaNotFound(SagaplaneError):
    """No saga has this id."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(f"saga {saga_id!r} not found")
        self.saga_id = saga_id


class IdempotencyConflict(SagaplaneError):
    """The idempotency key was already used for a different request."""


class IllegalTransition(SagaplaneError):
    """The request is not allowed in the saga's current state."""


class StorageUnavailable(SagaplaneError):
    """The database cannot be reached right now; retry later."""
