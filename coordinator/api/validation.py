"""Request validation: every limit, and an INVALID_ARGUMENT that names the field."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from coordinator import engine
from coordinator.errors import BadRequest, UnknownSaga, Violation
from coordinator.store.repository import SagaFilter, is_id
from sagaplane import structs
from sagaplane.limits import MAX_JSON_DEPTH, MAX_STEP_TIMEOUT
from sagaplane.v1 import coordinator_pb2, saga_pb2

MAX_STEPS = 100
MAX_CONDITION = 1000
MAX_NAME = 200
MAX_REASON = 1000
MAX_PAYLOAD_BYTES = 64 * 1024
"""Per context and per step input, serialized."""
MAX_REQUEST_BYTES = 1024 * 1024
"""Per StartSaga request (and per saga of a StartSagas request)."""
MAX_BATCH = 1000
"""Sagas in one StartSagas request."""
MAX_BATCH_BYTES = 2 * 1024 * 1024
"""A whole StartSagas request. Its answer holds every saga as recorded, a little larger
than the request, and must stay below a gRPC client's default 4 MiB (the servicer checks
it before anything is committed)."""
MAX_ATTEMPTS = 100
MAX_SAGA_TIMEOUT = timedelta(days=366)
MAX_INTERVAL = timedelta(days=1)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

# A routing key of plain words joined by dots: no AMQP topic wildcards (* and #).
_ACTION = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _text(value: str, field: str, *, required: bool, limit: int = MAX_NAME) -> str:
    if required and not value.strip():
        raise BadRequest(field, "is required")
    if len(value) > limit:
        raise BadRequest(field, f"is longer than {limit} characters")
    if "\x00" in value:
        # PostgreSQL's text cannot hold it.
        raise BadRequest(field, "must not contain a NUL character")
    return value


def _action(value: str, field: str, *, required: bool) -> str:
    _text(value, field, required=required)
    if value and not _ACTION.fullmatch(value):
        raise BadRequest(
            field, "must be words of letters, digits, '_' or '-' joined by dots, e.g. orders.create"
        )
    return value


def _payload(struct: struct_pb2.Struct, field: str) -> engine.JsonObject:
    if struct.ByteSize() > MAX_PAYLOAD_BYTES:
        raise BadRequest(field, f"is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        return structs.decode(struct, field, max_depth=MAX_JSON_DEPTH)
    except structs.InvalidJson as exc:
        raise BadRequest(exc.path, exc.problem) from exc


_NANOS = 1_000_000_000
_NANOS_PER_MS = 1_000_000


def _duration(
    value: duration_pb2.Duration, field: str, *, limit: timedelta, positive: bool = True
) -> timedelta:
    """A Duration checked on its protobuf fields, before any conversion can overflow.

    Durations have millisecond resolution (they are stored as such): a positive one
    below a millisecond counts as one millisecond, and others are rounded up to one.
    """
    if value.seconds < 0 or value.nanos < 0:
        raise BadRequest(field, "must not be negative")
    if value.nanos >= _NANOS:
        raise BadRequest(f"{field}.nanos", "must be less than 1000000000")
    # Python's integers do not overflow, unlike Duration.ToTimedelta().
    total = value.seconds * _NANOS + value.nanos
    if positive and total == 0:
        raise BadRequest(field, "must be positive")
    ms = -(-total // _NANOS_PER_MS)
    if ms > limit // timedelta(milliseconds=1):
        raise BadRequest(field, f"must be at most {limit}")
    return timedelta(milliseconds=ms)


def _retry_policy(
    has: bool, policy: saga_pb2.RetryPolicy, field: str, default: engine.RetryPolicy
) -> engine.RetryPolicy:
    """Fields left at zero keep ``default``'s values."""
    if not has:
        return default
    if policy.max_attempts > MAX_ATTEMPTS:
        raise BadRequest(f"{field}.max_attempts", f"must be at most {MAX_ATTEMPTS}")
    coefficient = policy.backoff_coefficient or default.backoff_coefficient
    if not 1.0 <= coefficient <= 10.0:
        raise BadRequest(f"{field}.backoff_coefficient", "must be between 1 and 10")
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
        # Name the field the caller set: the other one is a default they may not know.
        if policy.HasField("max_interval"):
            raise BadRequest(
                f"{field}.max_interval", f"must not be less than initial_interval ({initial})"
            )
        raise BadRequest(
            f"{field}.initial_interval",
            f"must not be more than max_interval ({maximum} unless given)",
        )
    return engine.RetryPolicy(
        max_attempts=policy.max_attempts or default.max_attempts,
        initial_interval=initial,
        backoff_coefficient=coefficient,
        max_interval=maximum,
    )


def start_request(request: coordinator_pb2.StartSagaRequest) -> engine.SagaSpec:
    """A validated StartSaga request, or BadRequest naming the first bad field."""
    if request.ByteSize() > MAX_REQUEST_BYTES:
        raise BadRequest("request", f"is larger than {MAX_REQUEST_BYTES} bytes")
    name = _text(request.name, "name", required=True)
    if not request.steps:
        raise BadRequest("steps", "at least one step is required")
    if len(request.steps) > MAX_STEPS:
        raise BadRequest("steps", f"at most {MAX_STEPS} steps are allowed")
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
            raise BadRequest(f"steps[{i}].name", f"duplicate step name {step_name!r}")
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
                depends_on=_depends_on(spec, i),
                when=_text(spec.when, f"steps[{i}].when", required=False, limit=MAX_CONDITION)
                or None,
            )
        )
    try:
        engine.plan(steps)
    except engine.InvalidSpec as exc:
        raise BadRequest(exc.field, exc.problem) from exc
    return engine.SagaSpec(
        name=name,
        steps=tuple(steps),
        context=_payload(request.context, "context"),
        idempotency_key=_text(request.idempotency_key, "idempotency_key", required=False) or None,
        timeout=saga_timeout,
    )


def start_requests(
    request: coordinator_pb2.StartSagasRequest,
) -> tuple[list[engine.SagaSpec], list[bytes]]:
    """The validated sagas of a StartSagas request and their :func:`canonical` bytes.

    Each saga is checked as StartSaga checks it; one BadRequest names the first bad field
    of every bad saga, by its path in the batch (``sagas[17].steps[0].action``). Sagas
    sharing an idempotency key must be the same request.
    """
    if request.ByteSize() > MAX_BATCH_BYTES:
        raise BadRequest("request", f"is larger than {MAX_BATCH_BYTES} bytes; send fewer sagas")
    if not request.sagas:
        raise BadRequest("sagas", "at least one saga is required")
    if len(request.sagas) > MAX_BATCH:
        raise BadRequest("sagas", f"at most {MAX_BATCH} sagas are allowed in one call")
    specs: list[engine.SagaSpec] = []
    fingerprints: list[bytes] = []
    violations: list[Violation] = []
    first_with_key: dict[str, int] = {}
    for i, saga in enumerate(request.sagas):
        at = f"sagas[{i}]"
        try:
            spec = start_request(saga)
        except BadRequest as exc:
            violations += [v.under(at) for v in exc.violations]
            continue
        specs.append(spec)
        fingerprints.append(canonical(saga))
        key = spec.idempotency_key
        if key is None:
            continue
        if key not in first_with_key:
            first_with_key[key] = i
        elif fingerprints[-1] != canonical(request.sagas[first_with_key[key]]):
            violations.append(
                Violation(
                    field=f"{at}.idempotency_key",
                    problem=f"is also sagas[{first_with_key[key]}]'s, for a different request",
                )
            )
    if violations:
        raise BadRequest.of(violations)
    return specs, fingerprints


def _depends_on(spec: coordinator_pb2.StepSpec, i: int) -> tuple[str, ...] | None:
    if spec.depends_on_nothing:
        if spec.depends_on:
            raise BadRequest(
                f"steps[{i}].depends_on_nothing", "must not be set together with depends_on"
            )
        return ()
    names = tuple(
        _text(name, f"steps[{i}].depends_on[{j}]", required=True)
        for j, name in enumerate(spec.depends_on)
    )
    return names or None


def canonical(request: coordinator_pb2.StartSagaRequest) -> bytes:
    """The request's bytes as the store fingerprints them for its idempotency key: the
    same whenever the request is (deterministic serialization, map keys sorted)."""
    return request.SerializeToString(deterministic=True)


def saga_id(value: str) -> str:
    """A well-formed saga id; a malformed one cannot exist, so it is NOT_FOUND."""
    if not value:
        raise BadRequest("id", "is required")
    if not is_id(value):
        raise UnknownSaga(value[:64])
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
        raise BadRequest("resolution", "must be RETRY or MARK_COMPENSATED")
    return choices[value]


def required_reason(value: str) -> str:
    """A reason that must be given (ResolveCompensation)."""
    return _text(value, "reason", required=True, limit=MAX_REASON)


def page_size(value: int) -> int:
    """0 means the default; larger than the maximum is treated as the maximum."""
    if value < 0:
        raise BadRequest("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def name_filter(value: str) -> str:
    """ListActive's optional name filter."""
    return _text(value, "name", required=False)


def after_position(value: int) -> int:
    """WatchSaga's resume point: a position from an earlier message, or 0."""
    if value < 0:
        raise BadRequest("after_position", "must not be negative")
    return value


_SAGA_STATES = {
    saga_pb2.SAGA_STATE_STARTED: engine.SagaState.STARTED,
    saga_pb2.SAGA_STATE_COMPLETED: engine.SagaState.COMPLETED,
    saga_pb2.SAGA_STATE_FAILED: engine.SagaState.FAILED,
    saga_pb2.SAGA_STATE_COMPENSATING: engine.SagaState.COMPENSATING,
    saga_pb2.SAGA_STATE_COMPENSATED: engine.SagaState.COMPENSATED,
    saga_pb2.SAGA_STATE_COMPENSATION_FAILED: engine.SagaState.COMPENSATION_FAILED,
}

# protobuf's Timestamp range (0001-01-01 to 9999-12-31), which datetime and PostgreSQL
# both hold.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS:
        raise BadRequest(field, "must be between 0001-01-01 and 9999-12-31")
    if not 0 <= value.nanos < _NANOS:
        raise BadRequest(field, "has nanos outside 0 to 999999999")
    return value.ToDatetime(tzinfo=UTC)


def list_filter(request: coordinator_pb2.ListSagasRequest) -> SagaFilter:
    """ListSagas' filters, each checked; a bad one is INVALID_ARGUMENT naming it."""
    states: list[engine.SagaState] = []
    for i, value in enumerate(request.states):
        state = _SAGA_STATES.get(value)
        if state is None:
            raise BadRequest(
                f"states[{i}]",
                "must be a saga state (" + ", ".join(s.name for s in _SAGA_STATES.values()) + ")",
            )
        if state not in states:
            states.append(state)
    created_after = created_before = None
    if request.HasField("created_after"):
        created_after = _timestamp(request.created_after, "created_after")
    if request.HasField("created_before"):
        created_before = _timestamp(request.created_before, "created_before")
        if created_after is not None and created_before <= created_after:
            raise BadRequest("created_before", "must be later than created_after")
    name = _text(request.name, "name", required=False)
    saga = _text(request.id, "id", required=False)
    key = _text(request.idempotency_key, "idempotency_key", required=False)
    return SagaFilter(
        states=tuple(sorted(states)),
        name=name or None,
        created_after=created_after,
        created_before=created_before,
        id=saga or None,
        idempotency_key=key or None,
    )


def filter_digest(kept: SagaFilter) -> str:
    """The filters as one string, the same whenever they are: a page token is valid
    for the filters it was issued for only."""
    return "ListSagas\x00" + repr(kept)
