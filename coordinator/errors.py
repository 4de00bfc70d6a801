"""The coordinator's errors; the API maps each to one gRPC status code.

    ServiceError            the coordinator cannot do what was asked
     ├── BadRequest         INVALID_ARGUMENT     a field is invalid; names the field
     ├── UnknownSaga        NOT_FOUND            no saga has this (or a malformed) id
     ├── KeyReused          ALREADY_EXISTS       key already used for another request
     ├── SlowWatcher        RESOURCE_EXHAUSTED   a WatchSaga client stopped reading
     └── StorageUnavailable UNAVAILABLE          the database cannot be reached; retry
    engine.WrongState       FAILED_PRECONDITION  not allowed in the saga's current state

The names say what the server refuses, and differ from the SDK's
(``sagaplane.errors``), whose names are public API and describe the same refusals as
a client receives them: ``BadRequest`` arrives as ``InvalidArgument``, ``UnknownSaga``
as ``SagaNotFound``, ``KeyReused`` as ``IdempotencyConflict`` and ``WrongState`` as
``IllegalTransition``. One name per class across both packages keeps a traceback or an
import unambiguous. ``WrongState`` is the engine's (the engine imports nothing from
here), so it is not a ServiceError; :data:`Refusal` names both.

Each class's docstring is its default message. A refusal about fields (BadRequest,
and KeyReused in a batch) carries them as :class:`Violation` s, which the API also sends
structurally (``google.rpc.BadRequest`` in the status details).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.engine.errors import WrongState

__all__ = [
    "BadRequest",
    "KeyReused",
    "Refusal",
    "ServiceError",
    "SlowWatcher",
    "StorageUnavailable",
    "UnknownSaga",
    "Violation",
]


@dataclass(frozen=True, kw_only=True)
class Violation:
    """One bad field of a request."""

    field: str
    """Its path in the request, e.g. ``sagas[17].steps[0].action``."""
    problem: str
    """What is wrong with it, e.g. ``is required``."""

    def under(self, prefix: str) -> Violation:
        """The same violation with its path inside ``prefix`` (``sagas[3]``)."""
        # "request" is StartSaga's name for the whole request: inside a batch, the saga.
        if self.field == "request":
            return Violation(field=prefix, problem=self.problem)
        joiner = "" if self.field.startswith("[") else "."
        return Violation(field=f"{prefix}{joiner}{self.field}", problem=self.problem)

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"


def describe(violations: Sequence[Violation]) -> str:
    """One message naming every violation: ``a: is required; b[2]: is too long``."""
    return "; ".join(map(str, violations))


class ServiceError(Exception):
    """The coordinator cannot do what was asked."""

    violations: tuple[Violation, ...] = ()
    """The fields the refusal is about, when it is about fields."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class BadRequest(ServiceError):
    """The request is invalid."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        """The first bad field."""
        self.violations = (Violation(field=field, problem=problem),)

    @classmethod
    def of(cls, violations: Sequence[Violation]) -> BadRequest:
        """One refusal naming several bad fields (at least one)."""
        first, *_ = violations
        exc = cls(first.field, first.problem)
        exc.args = (describe(violations),)
        exc.violations = tuple(violations)
        return exc


class UnknownSaga(ServiceError):
    """No saga has this id."""

    def __init__(self, saga_id: str) -> None:
        super().__init__(f"saga {saga_id!r} not found")
        self.saga_id = saga_id


class KeyReused(ServiceError):
    """The idempotency key was already used for a different request."""

    def __init__(self, message: str | None = None, *, violations: Sequence[Violation] = ()):
        super().__init__(message or (describe(violations) if violations else None))
        self.violations = tuple(violations)


class SlowWatcher(ServiceError):
    """The watcher did not read its messages in time; reconnect from the last position."""


class StorageUnavailable(ServiceError):
    """The database cannot be reached right now; retry later."""


Refusal = ServiceError | WrongState
"""Every error the API maps to a status code of its own."""
