"""The SDK's errors, one tree::

    SagaplaneError                   every error the SDK raises on purpose
    ├── StepFailed                   raised by a handler: the step failed (retryable)
    │   ├── RetryableError           ... and retrying may succeed
    │   │   └── DeadlineExceeded     the attempt's deadline passed (the SDK's reply)
    │   └── NonRetryableError        ... and retrying cannot help
    │       └── NoHandler            the participant has no handler for the action (the SDK's reply)
    ├── ConfigurationError           the SDK was set up wrongly (e.g. an action registered twice)
    ├── InvalidEvent                 a domain event that cannot be sent as given (also a ValueError)
    ├── BrokerUnavailable            RabbitMQ cannot be reached, or refused the login or vhost
    │   └── TopologyMissing          the core topology is missing, and this user may not declare it
    └── CoordinatorError             a call to the coordinator failed; ``.code`` is the gRPC status
        ├── InvalidArgument          INVALID_ARGUMENT: the request names the bad field(s)
        ├── SagaNotFound             NOT_FOUND
        ├── IdempotencyConflict      ALREADY_EXISTS: the key was used with a different request
        ├── IllegalTransition        FAILED_PRECONDITION
        ├── CoordinatorUnavailable   UNAVAILABLE or DEADLINE_EXCEEDED: try again later
        ├── ResourceExhausted        RESOURCE_EXHAUSTED: e.g. a watch that read too slowly
        ├── Unauthenticated          UNAUTHENTICATED: no token, or one the coordinator does not know
        ├── PermissionDenied         PERMISSION_DENIED: the caller's role does not allow the call
        └── WaitTimeout              SagaClient.wait() gave up (also a TimeoutError)

What a handler raises becomes the reply's ``StepError``: ``type`` is the exception's
class name (or ``error_type`` of a :class:`StepFailed`), ``message`` its text, and
``retryable`` comes from the class. **Any exception that is not a StepFailed counts as
retryable**: an unexpected error (a timeout, a lost connection, a bug fixed by the next
deploy) may well go away, and the coordinator's retry policy bounds the attempts. Raise
:class:`NonRetryableError` (or a subclass, e.g. ``class OutOfStock(NonRetryableError)``)
for business refusals that will fail the same way every time.

A refusal about fields (every INVALID_ARGUMENT, and a batch's ALREADY_EXISTS) lists them
in ``.violations`` (:class:`FieldViolation`, read from the status's
``google.rpc.BadRequest`` details): for ``SagaClient.start_sagas``, one per bad saga,
with its position in ``.index``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "FieldViolation",
    "IdempotencyConflict",
    "IllegalTransition",
    "InvalidArgument",
    "InvalidEvent",
    "NonRetryableError",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryableError",
    "SagaNotFound",
    "SagaplaneError",
    "StepFailed",
    "TopologyMissing",
    "Unauthenticated",
    "WaitTimeout",
]


class SagaplaneError(Exception):
    """A sagaplane error."""

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, so a bare `raise X()` still says something.
        super().__init__(message if message is not None else (type(self).__doc__ or "").strip())

    @property
    def message(self) -> str:
        """The error's text."""
        return str(self.args[0]) if self.args else ""


class StepFailed(SagaplaneError):
    """The step failed."""

    retryable: bool = True
    """Whether the coordinator may retry the step (class default; see the subclasses)."""

    def __init__(
        self,
        message: str | None = None,
        *,
        error_type: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type or type(self).__name__
        """Sent as ``StepError.type``: the class name unless given."""
        if retryable is not None:
            self.retryable = retryable


class RetryableError(StepFailed):
    """The step failed, and retrying it may succeed."""

    retryable = True


class DeadlineExceeded(RetryableError):
    """The attempt's deadline passed before its handler finished."""


class NonRetryableError(StepFailed):
    """The step failed, and retrying it cannot succeed."""

    retryable = False


class NoHandler(NonRetryableError):
    """The participant has no handler for the command's action (the SDK's reply)."""


class ConfigurationError(SagaplaneError):
    """The SDK was set up wrongly."""


class InvalidEvent(SagaplaneError, ValueError):
    """The domain event cannot be sent as given; the message names the attribute."""


class BrokerUnavailable(SagaplaneError, ConnectionError):
    """RabbitMQ cannot be reached, or refused the connection."""


class TopologyMissing(BrokerUnavailable):
    """RabbitMQ lacks Sagaplane's core topology (its exchanges, the replies and
    dead-letter queues), and this user may not declare it: start the coordinator first,
    or run `sagaplane rabbitmq-permissions --apply`."""


class DatabaseUnavailable(SagaplaneError, ConnectionError):
    """The service's PostgreSQL database cannot be reached, or does not exist."""


_INDEX = re.compile(r"\w+\[(\d+)\]")


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a refused request."""

    field: str
    """Its path in the request, e.g. ``sagas[17].steps[0].action``."""
    description: str
    """What is wrong with it, e.g. ``is required``."""

    @property
    def index(self) -> int | None:
        """The position in the batch (``17`` for ``sagas[17]...``); None for a field of
        the request as a whole."""
        found = _INDEX.match(self.field)
        return int(found.group(1)) if found else None

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class CoordinatorError(SagaplaneError):
    """A call to the coordinator failed."""

    def __init__(
        self,
        message: str | None = None,
        *,
        code: grpc.StatusCode | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        """The gRPC status code, when the error came from a call."""
        self.violations = violations
        """The bad fields, when the refusal is about fields (in the request's order)."""


class InvalidArgument(CoordinatorError):
    """The coordinator rejected the request as invalid."""


class SagaNotFound(CoordinatorError):
    """No saga has this id."""


class IdempotencyConflict(CoordinatorError):
    """The idempotency key was already used with a different request."""


class IllegalTransition(CoordinatorError):
    """The saga's state does not allow this operation."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator could not be reached or did not answer in time."""


class ResourceExhausted(CoordinatorError):
    """The coordinator refused to hold more for this call (a watch that read too slowly
    is cut off so: watch again from the last position seen)."""


class Unauthenticated(CoordinatorError):
    """The coordinator requires a token it knows (pass ``token``, or set SAGAPLANE_TOKEN)."""


class PermissionDenied(CoordinatorError):
    """The caller's role does not allow this call."""


class WaitTimeout(CoordinatorError, TimeoutError):
    """The saga did not reach a terminal state in time."""

    def __init__(self, message: str | None = None, *, saga: Any = None) -> None:
        super().__init__(message)
        self.saga = saga
        """The saga as last seen (a ``sagaplane.v1.saga_pb2.Saga``), or None."""


_BY_CODE: dict[grpc.StatusCode, type[CoordinatorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SagaNotFound,
    grpc.StatusCode.ALREADY_EXISTS: IdempotencyConflict,
    grpc.StatusCode.FAILED_PRECONDITION: IllegalTransition,
    grpc.StatusCode.UNAVAILABLE: CoordinatorUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: CoordinatorUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(exc: grpc.aio.AioRpcError) -> CoordinatorError:
    """The :class:`CoordinatorError` for a failed call (raise it ``from exc``)."""
    code = exc.code()
    cls = _BY_CODE.get(code, CoordinatorError)
    details = exc.details()
    message = f"{code.name}: {details}" if details else code.name
    return cls(message, code=code, violations=violations_of(exc))


def violations_of(exc: grpc.aio.AioRpcError) -> tuple[FieldViolation, ...]:
    """The field violations in a failed call's ``google.rpc.BadRequest`` details."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details that do not match the status: not the coordinator's
        return ()
    if status is None:
        return ()
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += (FieldViolation(v.field, v.description) for v in bad.field_violations)
    return tuple(found)
