"""Pure checks of what comes from outside: Structs, durations, retry policies, page tokens,
reply bodies. Whatever they are given, they answer with a value or their own error that
names the field — never another exception."""

from __future__ import annotations

import contextlib
import math
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import duration_pb2, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.api import validation
from coordinator.api.page_tokens import PageTokens
from coordinator.engine import CommandKind
from coordinator.errors import BadRequest, UnknownSaga
from coordinator.messaging.codec import UndecodableReply, decode_reply
from sagaplane import structs
from sagaplane.limits import MAX_JSON_DEPTH, MAX_OUTPUT_BYTES, clean_text
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import messages_pb2
from sagaplane.v1 import saga_pb2 as model

ULID = "01J0000000000000000000SAGA"
STEP = "01J0000000000000000000STEP"

# -- JSON in a Struct ------------------------------------------------------------------

storable = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text().filter(lambda s: "\x00" not in s),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text().filter(lambda s: "\x00" not in s), inner, max_size=4)
    ),
    max_leaves=20,
)
hostile = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | st.sampled_from([math.nan, math.inf, -math.inf, "\x00", "a\x00b"])
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _bad(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_bad(v) for v in value)
    if isinstance(value, dict):
        return any("\x00" in k or _bad(v) for k, v in value.items())
    return False


@given(st.dictionaries(st.text().filter(lambda s: "\x00" not in s), storable, max_size=5))
def test_a_storable_object_decodes_to_itself(obj: dict[str, Any]) -> None:
    assert structs.decode(structs.to_struct(obj), "context") == structs.integral(obj)


@given(st.dictionaries(st.text(), hostile, max_size=5))
def test_decode_refuses_exactly_what_postgresql_cannot_hold(obj: dict[str, Any]) -> None:
    struct = structs.to_struct(obj)
    if _bad(obj):
        with pytest.raises(structs.InvalidJson) as raised:
            structs.decode(struct, "context")
        assert raised.value.path.startswith("context")
        assert str(raised.value).startswith(raised.value.path + ": ")
    else:
        assert structs.decode(struct, "context") == structs.integral(obj)


def test_decode_names_the_place_of_the_problem() -> None:
    obj = {"items": [{"price": 1}, {"price": math.nan}], "note": "fine"}
    with pytest.raises(structs.InvalidJson, match=r"^steps\[0\]\.input\.items\[1\]\.price: is not"):
        structs.decode(structs.to_struct(obj), "steps[0].input")
    with pytest.raises(structs.InvalidJson, match=r'^context\["a b\\u0000"\]: the key contains'):
        structs.decode(structs.to_struct({"a b\x00": 1}), "context")
    with pytest.raises(structs.InvalidJson, match="has no value"):
        struct = struct_pb2.Struct()
        struct.fields["unset"].Clear()
        structs.decode(struct, "context")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_depth_limit_counts_levels_of_objects_and_lists(depth: int) -> None:
    obj: dict[str, Any] = {}
    inner: Any = obj
    for level in range(depth - 1):
        nxt: Any = {} if level % 2 else []
        if isinstance(inner, dict):
            inner["x"] = nxt
        else:
            inner.append(nxt)
        inner = nxt
    struct = structs.to_struct(obj)
    if depth <= MAX_JSON_DEPTH:
        structs.decode(struct, "c")
    else:
        with pytest.raises(structs.InvalidJson, match="nested deeper than"):
            structs.decode(struct, "c")


@given(st.text(), st.integers(min_value=1, max_value=50))
def test_clean_text_is_storable_and_bounded(text: str, limit: int) -> None:
    cleaned = clean_text(text, limit)
    assert "\x00" not in cleaned and len(cleaned) <= limit
    if "\x00" not in text and len(text) <= limit:
        assert cleaned == text


# -- durations and retry policies --------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def _request(**fields: Any) -> api.StartSagaRequest:
    base: dict[str, Any] = {"name": "order", "steps": [api.StepSpec(name="a", action="a.run")]}
    return api.StartSagaRequest(**(base | fields))


@given(int64, int32)
def test_any_duration_is_accepted_or_refused_by_name(seconds: int, nanos: int) -> None:
    for field in ("step_timeout", "timeout"):
        request = _request(**{field: duration_pb2.Duration(seconds=seconds, nanos=nanos)})
        try:
            validation.start_request(request)
        except BadRequest as exc:
            assert exc.field in (field, f"{field}.nanos"), exc


def test_duration_edges() -> None:
    one_ns = _request(step_timeout=duration_pb2.Duration(nanos=1))
    assert validation.start_request(one_ns).steps[0].timeout.total_seconds() == 0.001
    with pytest.raises(BadRequest, match=r"^step_timeout\.nanos: must be less than"):
        validation.start_request(_request(step_timeout=duration_pb2.Duration(nanos=10**9)))
    with pytest.raises(BadRequest, match=r"^step_timeout: must be positive"):
        validation.start_request(_request(step_timeout=duration_pb2.Duration()))
    with pytest.raises(BadRequest, match=r"^timeout: must be at most"):
        validation.start_request(_request(timeout=duration_pb2.Duration(seconds=2**62)))


def test_a_retry_policy_error_names_the_field_the_caller_set() -> None:
    day = duration_pb2.Duration(seconds=86400)
    request = _request(retry_policy=model.RetryPolicy(initial_interval=day))
    with pytest.raises(BadRequest, match=r"^retry_policy\.initial_interval: must not be more"):
        validation.start_request(request)
    request = _request(
        retry_policy=model.RetryPolicy(max_interval=duration_pb2.Duration(nanos=1000))
    )
    with pytest.raises(BadRequest, match=r"^retry_policy\.max_interval: must not be less"):
        validation.start_request(request)


@pytest.mark.parametrize("field", ["name", "idempotency_key"])
def test_nul_in_a_text_field_is_refused_by_name(field: str) -> None:
    request = _request(**{field: "a\x00b"})
    with pytest.raises(BadRequest, match=f"^{field}: must not contain a NUL"):
        validation.start_request(request)


def test_nul_in_a_step_name_or_reason_is_refused_by_name() -> None:
    request = api.StartSagaRequest(name="o", steps=[api.StepSpec(name="a\x00", action="a")])
    with pytest.raises(BadRequest, match=r"^steps\[0\]\.name: must not contain a NUL"):
        validation.start_request(request)
    with pytest.raises(BadRequest, match=r"^reason: must not contain a NUL"):
        validation.reason("x\x00")
    with pytest.raises(BadRequest, match=r"^name: must not contain a NUL"):
        validation.name_filter("x\x00")


def test_an_id_with_a_trailing_newline_is_no_saga_id() -> None:
    with pytest.raises(UnknownSaga):
        validation.saga_id(ULID + "\n")


# -- page tokens --------------------------------------------------------------------------

TOKENS = PageTokens(b"k" * 32)


@given(st.text(max_size=200), st.text(max_size=20))
def test_any_page_token_is_refused_by_name_unless_issued(token: str, name: str) -> None:
    try:
        after = TOKENS.decode(token, name)
    except BadRequest as exc:
        assert exc.field == "page_token"
    else:
        assert after is None and token == ""


@given(st.text(max_size=20), st.data())
def test_a_tampered_page_token_is_refused(name: str, data: st.DataObject) -> None:
    token = TOKENS.encode(ULID, name)
    assert TOKENS.decode(token, name) == ULID
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    replacement = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    )
    tampered = token[:i] + replacement + token[i + 1 :]
    if tampered != token:
        with pytest.raises(BadRequest, match=r"^page_token: "):
            TOKENS.decode(tampered, name)


def test_a_page_token_is_bound_to_its_filter_and_key() -> None:
    token = TOKENS.encode(ULID, "order")
    with pytest.raises(BadRequest, match="different name filter"):
        TOKENS.decode(token, "refund")
    with pytest.raises(BadRequest, match="not a token returned by ListActive"):
        PageTokens(b"o" * 32).decode(token, "order")


# -- reply bodies ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_reply_body_decodes_or_is_undecodable(body: bytes) -> None:
    with contextlib.suppress(UndecodableReply):
        decode_reply(body)


def _reply(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "saga_id": ULID,
        "step_id": STEP,
        "attempt": 1,
        "kind": messages_pb2.COMMAND_KIND_EXECUTE,
        "outcome": messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        "token": "t",
    }
    return messages_pb2.StepReply(**(base | fields)).SerializeToString()


def test_a_reply_with_a_non_finite_output_is_undecodable_not_a_crash() -> None:
    with pytest.raises(UndecodableReply, match=r"^output\.x: is not a finite number"):
        decode_reply(_reply(output=structs.to_struct({"x": math.nan})))
    with pytest.raises(UndecodableReply, match="saga_id is not a saga id"):
        decode_reply(_reply(saga_id="01J00000000000000000\x00NUL"))


def test_an_oversized_output_is_measured_not_decoded() -> None:
    _, event = decode_reply(_reply(output=structs.to_struct({"x": "y" * MAX_OUTPUT_BYTES})))
    assert event.output is None and event.output_size > MAX_OUTPUT_BYTES


def test_a_failure_reply_is_cleaned_and_cut_never_refused() -> None:
    error = messages_pb2.StepError(type="Bad\x00Type", message="m\x00" * 5000)
    _, event = decode_reply(_reply(outcome=messages_pb2.REPLY_OUTCOME_FAILED, error=error))
    assert event.error is not None and "\x00" not in event.error
    assert event.error.startswith("Bad\N{REPLACEMENT CHARACTER}Type: m")
    assert len(event.error) < 2300
    assert event.kind is CommandKind.EXECUTE


def test_field_names_in_messages_look_like_fields() -> None:
    # The convention the API fuzz test relies on: "<field path>: <problem>".
    exc = BadRequest("steps[3].input.a", "is not a finite number")
    assert re.match(r"^[a-z_]+(\[\d+\])?\.", str(exc))


# -- response sizes ----------------------------------------------------------------------


def test_a_long_history_is_cut_to_fit_keeping_the_first_and_newest_entries() -> None:
    from coordinator.api.servicer import fit_history

    saga = model.Saga(id=ULID, name="order", state=model.SAGA_STATE_COMPENSATING)
    saga.history.append(model.HistoryEntry(event="saga_started"))
    for i in range(5000):
        saga.history.append(model.HistoryEntry(event="step_attempt_failed", reason=f"{i} " * 300))
    budget = 1024 * 1024
    assert saga.ByteSize() > budget
    fit_history(saga, budget)
    assert saga.ByteSize() <= budget
    events = [h.event for h in saga.history]
    assert events[:2] == ["saga_started", "history_truncated"]
    assert saga.history[-1].reason.startswith("4999 ")
    left_out = int(saga.history[1].reason.split()[0])
    assert left_out + len(saga.history) - 2 == 5000

    small = model.Saga(id=ULID, history=[model.HistoryEntry(event="saga_started")])
    fit_history(small, budget)
    assert [h.event for h in small.history] == ["saga_started"]


def test_a_list_sagas_page_token_carries_its_sagas_creation_time() -> None:
    at = datetime(2026, 12, 1, 22, 59, 36, 123456, tzinfo=UTC)
    token = TOKENS.encode(ULID, "digest", created_at=at)
    assert TOKENS.position(token, "digest") == (ULID, at)
    assert TOKENS.decode(token, "digest") == ULID
    assert TOKENS.position(TOKENS.encode(ULID, "digest"), "digest") == (ULID, None)
    with pytest.raises(BadRequest, match="not a token returned by ListSagas"):
        PageTokens(b"o" * 32).position(token, "digest", listing="ListSagas")
