"""Every RPC fuzzed from outside, against a real coordinator: generated requests hold
control characters and NUL, huge and non-finite numbers, extreme durations and nanos,
deep nesting, random and tampered page tokens, and raw undecodable bytes.

Whatever comes in, the answer is a status a client can act on (never INTERNAL or
UNKNOWN), an INVALID_ARGUMENT names the field that is wrong, a rejected call writes no
row, and the server goes on serving. The example budget is fixed so CI time is too.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.app import Coordinator
from helpers.coordinators import coordinator_settings
from helpers.transitions import STEPS, request, succeed
from sagaplane import structs
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub

FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples in every CI run
)
ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
FIELDS = {
    "request",
    "name",
    "steps",
    "context",
    "idempotency_key",
    "retry_policy",
    "compensation_retry_policy",
    "step_timeout",
    "timeout",
    "id",
    "reason",
    "resolution",
    "page_size",
    "page_token",
    "stale_for",
    "sagas",
    "after_position",
    "states",
    "created_after",
    "created_before",
}
ROWS = """
SELECT (SELECT count(*) FROM sagaplane_sagas), (SELECT count(*) FROM sagaplane_steps),
       (SELECT count(*) FROM sagaplane_history), (SELECT count(*) FROM sagaplane_outbox)
"""

# -- strategies ------------------------------------------------------------------------

nasty_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=10),
    st.sampled_from(["\x00", "a\x00", "orders.create\x00", " ", "x" * 201, "*.#", "a..b"]),
)
numbers = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 2.0**53 + 1]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | nasty_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
    max_leaves=12,
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
durations = st.one_of(
    st.builds(duration_pb2.Duration, seconds=int64, nanos=int32),
    st.builds(
        duration_pb2.Duration,
        seconds=st.integers(min_value=0, max_value=100_000),
        nanos=st.integers(min_value=0, max_value=10**9 + 5),
    ),
)

timestamps = st.one_of(
    st.builds(timestamp_pb2.Timestamp, seconds=int64, nanos=int32),
    st.builds(
        timestamp_pb2.Timestamp,
        seconds=st.integers(min_value=-62_135_596_801, max_value=253_402_300_800),
        nanos=st.integers(min_value=0, max_value=10**9 + 5),
    ),
)


def _deep(levels: int) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for _ in range(levels):
        obj = {"a": obj}
    return obj


@st.composite
def structs_(draw: st.DrawFn) -> struct_pb2.Struct:
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return structs.to_struct(_deep(draw(st.integers(min_value=18, max_value=26))))
    return structs.to_struct(draw(st.dictionaries(nasty_text, json_values, max_size=4)))


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


retry_policies = st.builds(
    model.RetryPolicy,
    max_attempts=st.integers(min_value=0, max_value=2**32 - 1),
    initial_interval=_maybe(durations),
    backoff_coefficient=numbers,
    max_interval=_maybe(durations),
)
actions = st.one_of(st.sampled_from(["orders.create", "a", "pay-1.charge_x"]), nasty_text)
step_specs = st.builds(
    api.StepSpec,
    name=nasty_text,
    action=actions,
    compensation=st.one_of(st.just(""), actions),
    input=_maybe(structs_()),
    retry_policy=_maybe(retry_policies),
    timeout=_maybe(durations),
)
valid_steps = st.lists(
    st.builds(
        api.StepSpec,
        name=st.sampled_from(["create", "reserve", "charge"]),
        action=st.sampled_from(["orders.create", "stock.reserve"]),
        compensation=st.sampled_from(["", "orders.delete"]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda spec: spec.name,
)
hostile_fields: dict[str, st.SearchStrategy[Any]] = {
    "name": nasty_text,
    "steps": st.lists(step_specs, max_size=3),
    "context": structs_(),
    "idempotency_key": nasty_text,
    "retry_policy": retry_policies,
    "compensation_retry_policy": retry_policies,
    "step_timeout": durations,
    "timeout": durations,
}


@st.composite
def start_requests(draw: st.DrawFn) -> api.StartSagaRequest:
    """A valid request with one to three fields made hostile, so that each field's own
    checks are reached (a request wrong everywhere stops at its first field)."""
    fields: dict[str, Any] = {"name": "order.place", "steps": draw(valid_steps)}
    for field in draw(st.lists(st.sampled_from(sorted(hostile_fields)), min_size=1, max_size=3)):
        fields[field] = draw(hostile_fields[field])
    return api.StartSagaRequest(**fields)


ids = st.one_of(
    st.just("01J0000000000000000000SAGA"), st.just("01J0000000000000000000SAGA\n"), nasty_text
)
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
page_tokens = st.one_of(
    st.text(max_size=80),
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=80
    ),
    st.just("W10"),  # base64 of "[]"
    st.just("W" * 5000),
)

# -- the check -------------------------------------------------------------------------


@pytest.fixture
async def coordinator(database_url: str, amqp_url: str) -> AsyncIterator[Coordinator]:
    """A coordinator whose timers never fire during a test: a saga an earlier example
    started with a short step timeout would otherwise time out in the middle of a later
    call, and its rows would be taken for rows a refused request wrote."""
    settings = coordinator_settings(database_url, amqp_url, timer_interval=3600.0)
    async with Coordinator(settings) as running:
        yield running


@pytest.fixture
async def fuzz(coordinator: Coordinator, database_url: str) -> AsyncIterator[Fuzz]:
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db,
    ):
        yield Fuzz(channel, db)


class Fuzz:
    """Calls one RPC and checks the answer, the rows and the server's health."""

    def __init__(self, channel: grpc.aio.Channel, db: psycopg.AsyncConnection[Any]) -> None:
        self.channel = channel
        self.stub = Stub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.db = db
        self.codes: dict[str, int] = {}
        self.violations: list[tuple[str, str]] = []
        """The google.rpc.BadRequest field violations of the last refusal."""

    async def rows(self) -> tuple[int, ...]:
        cur = await self.db.execute(ROWS)
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    async def call(self, method: str, request: Any) -> Any:
        return await self.check(method, getattr(self.stub, method), request)

    async def call_raw(self, method: str, body: bytes) -> Any:
        """Send ``body`` as the request, as it is: no protobuf on the client side."""
        path = f"/sagaplane.v1.SagaCoordinatorService/{method}"
        if method in STREAMING:
            stream = self.channel.unary_stream(
                path, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            return await self.check(method, _whole(stream), body)
        call = self.channel.unary_unary(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        return await self.check(method, call, body)

    async def call_stream(self, method: str, request: Any) -> Any:
        """A server-streaming call, read to its end (its messages as a list)."""
        return await self.check(method, _whole(getattr(self.stub, method)), request)

    async def check(self, method: str, call: Any, request: Any) -> Any:
        before = await self.rows()
        self.violations = []
        try:
            response = await call(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            self.codes[code.name] = self.codes.get(code.name, 0) + 1
            assert code in ACCEPTABLE, f"{method} answered {code.name}: {details}"
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                field = re.split(r"[.\[:]", details, maxsplit=1)[0]
                assert field in FIELDS and ": " in details, f"names no field: {details!r}"
                self.violations = _violations(exc)
                assert self.violations, f"no BadRequest details: {details!r}"
            assert await self.rows() == before, f"{method} was refused but wrote rows"
            response = None
        else:
            self.codes["OK"] = self.codes.get("OK", 0) + 1
        served = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert served.status == health_pb2.HealthCheckResponse.SERVING
        return response


@FUZZ
@given(request=start_requests())
async def test_start_saga_answers_every_request(fuzz: Fuzz, request: api.StartSagaRequest) -> None:
    response = await fuzz.call("StartSaga", request)
    if response is not None:
        # What was accepted can be read back, whole.
        await fuzz.call("GetSaga", api.GetSagaRequest(id=response.saga.id, include_history=True))


@FUZZ
@given(
    sagas=st.lists(st.one_of(start_requests(), st.builds(api.StartSagaRequest)), max_size=4),
    valid=st.integers(min_value=0, max_value=3),
    key=st.one_of(st.none(), nasty_text),
)
async def test_start_sagas_answers_every_batch(
    fuzz: Fuzz, sagas: list[api.StartSagaRequest], valid: int, key: str | None
) -> None:
    good = [
        api.StartSagaRequest(name="order.place", steps=[api.StepSpec(name="s", action="a")])
        for _ in range(valid)
    ]
    if key is not None and good:
        for saga in good:  # one key for several sagas: the same request, or not
            saga.idempotency_key = key
        good[-1].name = "order.other"
    batch = api.StartSagasRequest(sagas=[*good, *sagas])
    response = await fuzz.call("StartSagas", batch)
    if response is not None:
        assert len(response.sagas) == len(batch.sagas)
    else:
        # Every field the details name is a field of the batch.
        for field, _ in fuzz.violations:
            assert field == "sagas" or field.startswith(("sagas[", "request")), field


@FUZZ
@given(saga_id=ids, history=st.booleans())
async def test_get_saga_answers_every_id(fuzz: Fuzz, saga_id: str, history: bool) -> None:
    await fuzz.call("GetSaga", api.GetSagaRequest(id=saga_id, include_history=history))


@FUZZ
@given(saga_id=ids, reason=nasty_text)
async def test_compensate_answers_every_request(fuzz: Fuzz, saga_id: str, reason: str) -> None:
    await fuzz.call("Compensate", api.CompensateRequest(id=saga_id, reason=reason))


@FUZZ
@given(
    saga_id=ids,
    resolution=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    reason=nasty_text,
)
async def test_resolve_compensation_answers_every_request(
    fuzz: Fuzz, saga_id: str, resolution: int, reason: str
) -> None:
    request = api.ResolveCompensationRequest(id=saga_id, resolution=resolution, reason=reason)  # type: ignore[arg-type]
    await fuzz.call("ResolveCompensation", request)


@FUZZ
@given(
    page_size=int32,
    page_token=page_tokens,
    name=st.one_of(st.just(""), nasty_text),
    stale_for=_maybe(durations),
)
async def test_list_active_answers_every_request(
    fuzz: Fuzz,
    page_size: int,
    page_token: str,
    name: str,
    stale_for: duration_pb2.Duration | None,
) -> None:
    request = api.ListActiveRequest(
        page_size=page_size, page_token=page_token, name=name, stale_for=stale_for
    )
    await fuzz.call("ListActive", request)


async def test_a_tampered_page_token_is_invalid_argument(fuzz: Fuzz) -> None:
    for i in range(3):
        await fuzz.stub.StartSaga(
            api.StartSagaRequest(name="order", steps=[api.StepSpec(name=f"s{i}", action="a")])
        )
    page = await fuzz.stub.ListActive(api.ListActiveRequest(page_size=1))
    token = page.next_page_token
    assert token
    for i in range(len(token)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await fuzz.stub.ListActive(api.ListActiveRequest(page_size=1, page_token=flipped))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("page_token: ")


@FUZZ
@given(saga_id=ids, after=int64)
async def test_watch_saga_answers_every_request(fuzz: Fuzz, saga_id: str, after: int) -> None:
    await fuzz.call_stream("WatchSaga", api.WatchSagaRequest(id=saga_id, after_position=after))


async def test_watch_saga_of_a_finished_saga_answers_every_position(
    fuzz: Fuzz, coordinator: Coordinator
) -> None:
    assert coordinator.store is not None
    saga = (await fuzz.stub.StartSaga(request())).saga
    for _ in STEPS:
        await succeed(coordinator.store, saga.id)
    for after in (0, 1, 2**62, -1, -(2**63)):
        await fuzz.call_stream("WatchSaga", api.WatchSagaRequest(id=saga.id, after_position=after))


@FUZZ
@given(
    page_size=int32,
    page_token=page_tokens,
    states=st.lists(st.one_of(st.integers(min_value=0, max_value=6), int32), max_size=8),
    name=st.one_of(st.just(""), nasty_text),
    created_after=_maybe(timestamps),
    created_before=_maybe(timestamps),
    saga_id=st.one_of(st.just(""), ids),
    key=st.one_of(st.just(""), nasty_text),
)
async def test_list_sagas_answers_every_request(
    fuzz: Fuzz,
    page_size: int,
    page_token: str,
    states: list[int],
    name: str,
    created_after: timestamp_pb2.Timestamp | None,
    created_before: timestamp_pb2.Timestamp | None,
    saga_id: str,
    key: str,
) -> None:
    request = api.ListSagasRequest(
        page_size=page_size,
        page_token=page_token,
        states=states,  # type: ignore[arg-type]
        name=name,
        created_after=created_after,
        created_before=created_before,
        id=saga_id,
        idempotency_key=key,
    )
    await fuzz.call("ListSagas", request)


METHODS = sorted(api.DESCRIPTOR.services_by_name["SagaCoordinatorService"].methods_by_name)
STREAMING = {
    name
    for name, method in api.DESCRIPTOR.services_by_name[
        "SagaCoordinatorService"
    ].methods_by_name.items()
    if method.server_streaming
}


@FUZZ
@given(body=st.binary(max_size=200), method=st.sampled_from(METHODS))
async def test_raw_bytes_as_a_request_are_answered(fuzz: Fuzz, body: bytes, method: str) -> None:
    await fuzz.call_raw(method, body)


async def test_requests_nested_past_protobufs_limit_are_invalid_argument(fuzz: Fuzz) -> None:
    # Built by hand, as an attacker would: a context of 120 nested objects {"a": {...}}.
    nested = b""
    for _ in range(120):
        value = b"\x2a" + _varint(len(nested)) + nested  # Value.struct_value
        entry = b"\x0a\x01a\x12" + _varint(len(value)) + value  # fields["a"] = value
        nested = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields
    body = b"\x0a\x01x" + b"\x1a" + _varint(len(nested)) + nested  # name, context
    await fuzz.call_raw("StartSaga", body)


def _whole(method: Any) -> Any:
    """A streaming method as a call that answers with every message (within 10 s: every
    stream fuzzed here is of a saga that has ended, or of none)."""

    async def call(request: Any, timeout: float) -> list[Any]:
        return [m async for m in method(request, timeout=timeout)]

    return call


def _violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(exc)
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
