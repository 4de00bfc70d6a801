"""Request validation: every limit, and an INVALID_ARGUMENT that names the field."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from coordinator import engine
from coordinator.errors import InvalidArgument, SagaNotFound
from coordinator.store.repository import NewSaga
from sagaplane import structs
from sagaplane.v1 import coordinator_pb2, saga_pb2

MAX_STEPS = 100
MAX_NAME = 200
MAX_REASON = 1000
MAX_PAYLOAD_BYTES = 64 * 1024
"""Per context and per step input, serialized."""
MAX_REQUEST_BYTES = 1024 * 1024
# Protobuf's decoder stops near 30 levels of Struct nesting; ours must bite first.
MAX_JSON_DEPTH = 20
MAX_ATTEMPTS = 100
MAX_STEP_TIMEOUT = timedelta(days=1)
MAX_SAGA_TIMEOUT = timedelta(days=366)
MAX_INTERVAL = timedelta(days=1)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# A routing key of plain words joined by dots: no AMQP topic wildcards (* and #).
_ACTION = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def _text(value: str, field: str, *, required: bool, limit: int = MAX_NAME) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "is required")
    if len(value) > limit:
        raise InvalidArgument(field, f"is longer than {limit} characters")
    return value


def _action(value: str, field: str, *, required: bool) -> str:
    _text(value, field, required=required)
    if value and not _ACTION.match(value):
        raise InvalidArgument(
            field, "must be words of letters, digits, '_' or '-' joined by dots, e.g. orders.create"
        )
    return value


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _payload(struct: struct_pb2.Struct, field: str) -> engine.JsonObject:
    if struct.ByteSize() > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(field, f"is larger than {MAX_PAYLOAD_BYTES} bytes")
    obj = structs.to_dict(struct)
    if _depth(obj) > MAX_JSON_DEPTH:
        raise InvalidArgument(field, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _duration(
    value: duration_pb2.Duration, field: str, *, limit: timedelta, positive: bool = True
) -> timedelta:
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(field, "must not be negative")
    result = value.ToTimedelta()
    if positive and result <= timedelta(0):
        raise InvalidArgument(field, "must be positive")
    if result > limit:
        raise InvalidArgument(field, f"must be at most {limit}")
    return result


def _retry_policy(
    has: bool, policy: saga_pb2.RetryPolicy, field: str, default: engine.RetryPolicy
) -> engine.RetryPolicy:
    """Fields left at zero keep ``default``'s values."""
    if not has:
        return default
    if policy.max_attempts > MAX_ATTEMPTS:
        raise InvalidArgument(f"{field}.max_attempts", f"must be at most {MAX_ATTEMPTS}")
    coefficient = policy.backoff_coefficient or default.backoff_coefficient
    if not 1.0 <= coefficient <= 10.0:
        raise InvalidArgument(f"{field}.backoff_coefficient", "must be between 1 and 10")
    initial = default.initial_interval
    if policy.HasField("initial_interval"):
        initial = _duration(
            policy.initial_interval, f"{field}.initial_interval", limit=MAX_INTERVAL, positive=False
        )
    maximum = default.max_interval
    if policy.HasField("max_interval"):
        maximum = _duration(
            policy.max_interval, f"{field}.max_interval", limit=MAX_INTERVAL, positive=False
        )
    if maximum < initial:
        raise InvalidArgument(f"{field}.max_interval", "must not be less than initial_interval")
    return engine.RetryPolicy(
        max_attempts=policy.max_attempts or default.max_attempts,
        initial_interval=initial,
        backoff_coefficient=coefficient,
        max_interval=maximum,
    )


def start_request(request: coordinator_pb2.StartSagaRequest) -> NewSaga:
    """A validated StartSaga request, or InvalidArgument naming the first bad field."""
    if request.ByteSize() > MAX_REQUEST_BYTES:
        raise InvalidArgument("request", f"is larger than {MAX_REQUEST_BYTES} bytes")
    name = _text(request.name, "name", required=True)
    if not request.steps:
        raise InvalidArgument("steps", "at least one step is required")
    if len(request.steps) > MAX_STEPS:
        raise InvalidArgument("steps", f"at most {MAX_STEPS} steps are allowed")
    retry = _retry_policy(
        request.HasField("retry_policy"), request.retry_policy, "retry_policy", engine.DEFAULT_RETRY
    )
    compensation_retry = _retry_policy(
        request.HasField("compensation_retry_policy"),
        request.compensation_retry_policy,
        "compensation_retry_policy",
        engine.DEFAULT_COMPENSATION_RETRY,
    )
    step_timeout = engine.DEFAULT_STEP_TIMEOUT
    if request.HasField("step_timeout"):
        step_timeout = _duration(request.step_timeout, "step_timeout", limit=MAX_STEP_TIMEOUT)
    saga_timeout = None
    if request.HasField("timeout"):
        saga_timeout = _duration(request.timeout, "timeout", limit=MAX_SAGA_TIMEOUT)
    seen: set[str] = set()
    steps = []
    for i, spec in enumerate(request.steps):
        step_name = _text(spec.name, f"steps[{i}].name", required=True)
        if step_name in seen:
            raise InvalidArgument(f"steps[{i}].name", f"duplicate step name {step_name!r}")
        seen.add(step_name)
        steps.append(
            engine.StepSpec(
                name=step_name,
                action=_action(spec.action, f"steps[{i}].action", required=True),
                compensation=_action(spec.compensation, f"steps[{i}].compensation", required=False)
                or None,
                input=_payload(spec.input, f"steps[{i}].input"),
                retry=_retry_policy(
                    spec.HasField("retry_policy"),
                    spec.retry_policy,
                    f"steps[{i}].retry_policy",
                    retry,
                ),
                compensation_retry=_retry_policy(
                    spec.HasField("compensation_retry_policy"),
                    spec.compensation_retry_policy,
                    f"steps[{i}].compensation_retry_policy",
                    compensation_retry,
                ),
                timeout=_duration(spec.timeout, f"steps[{i}].timeout", limit=MAX_STEP_TIMEOUT)
                if spec.HasField("timeout")
                else step_timeout,
            )
        )
    return NewSaga(
        name=name,
        steps=tuple(steps),
        context=_payload(request.context, "context"),
        idempotency_key=_text(request.idempotency_key, "idempotency_key", required=False) or None,
        request_hash=hashlib.sha256(request.SerializeToString(deterministic=True)).digest(),
        timeout=saga_timeout,
    )


def saga_id(value: str) -> str:
    """A well-formed saga id; a malformed one cannot exist, so it is NOT_FOUND."""
    if not value:
        raise InvalidArgument("id", "is required")
    if not _ULID.match(value):
        raise SagaNotFound(value[:64])
    return value


def reason(value: str) -> str:
    """A Compensate reason within its limit."""
    return _text(value, "reason", required=False, limit=MAX_REASON)


def stale_for(request: coordinator_pb2.ListActiveRequest) -> timedelta:
    """The ListActive staleness filter; zero when not asked for."""
    if not request.HasField("stale_for"):
        return timedelta(0)
    return _duration(request.stale_for, "stale_for", limit=MAX_SAGA_TIMEOUT, positive=False)


def resolution(value: coordinator_pb2.CompensationResolution.ValueType) -> engine.Resolution:
    """The operator's decision in ResolveCompensation."""
    choices = {
        coordinator_pb2.COMPENSATION_RESOLUTION_RETRY: engine.Resolution.RETRY,
        coordinator_pb2.COMPENSATION_RESOLUTION_MARK_COMPENSATED: (
            engine.Resolution.MARK_COMPENSATED
        ),
    }
    if value not in choices:
        raise InvalidArgument("resolution", "must be RETRY or MARK_COMPENSATED")
    return choices[value]


def required_reason(value: str) -> str:
    """A reason that must be given (ResolveCompensation)."""
    return _text(value, "reason", required=True, limit=MAX_REASON)


def page_size(value: int) -> int:
    """0 means the default; larger than the maximum is treated as the maximum."""
    if value < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(after: str, name: str) -> str:
    """An opaque token to continue a listing after the saga ``after``."""
    raw = json.dumps({"after": after, "name": name}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, name: str) -> str | None:
    """The id to continue after; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after = data["after"]
        same_filter = data["name"] == name
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("page_token", "is not a token returned by ListActive") from exc
    if not isinstance(after, str) or not _ULID.match(after):
        raise InvalidArgument("page_token", "is not a token returned by ListActive")
    if not same_filter:
        raise InvalidArgument("page_token", "was issued for a different name filter")
    return after
