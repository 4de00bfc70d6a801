"""Sagaplane's Python SDK: participants, the coordinator client, the outbox and its relay."""

from sagaplane.client import Resolution, SagaClient, StepSpec, saga_request
from sagaplane.errors import (
    ConfigurationError,
    CoordinatorError,
    CoordinatorUnavailable,
    DeadlineExceeded,
    FieldViolation,
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    NonRetryableError,
    RetryableError,
    SagaNotFound,
    SagaplaneError,
    StepFailed,
    WaitTimeout,
)
from sagaplane.outbox import OutboundMessage, enqueue
from sagaplane.participant import (
    CallNext,
    Delivery,
    Handler,
    Middleware,
    Participant,
    Processed,
    StepContext,
    StepKind,
)
from sagaplane.relay import OutboxRelay
from sagaplane.sagas import TERMINAL_STATES, RetryPolicy, Saga, SagaState, StepStatus

__all__ = [
    "TERMINAL_STATES",
    "CallNext",
    "ConfigurationError",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "DeadlineExceeded",
    "Delivery",
    "FieldViolation",
    "Handler",
    "IdempotencyConflict",
    "IllegalTransition",
    "InvalidArgument",
    "Middleware",
    "NonRetryableError",
    "OutboundMessage",
    "OutboxRelay",
    "Participant",
    "Processed",
    "Resolution",
    "RetryPolicy",
    "RetryableError",
    "Saga",
    "SagaClient",
    "SagaNotFound",
    "SagaState",
    "SagaplaneError",
    "StepContext",
    "StepFailed",
    "StepKind",
    "StepSpec",
    "StepStatus",
    "WaitTimeout",
    "enqueue",
    "saga_request",
]
