"""Values a caller gives SagaClient that JSON cannot carry are refused before anything is
sent, naming the place (not protobuf's ``ValueError: Unexpected type``)."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagaplane import InvalidArgument, StepSpec, saga_request, structs

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), JSON, max_size=5))
def test_every_json_object_encodes_as_protobuf_would(obj: dict[str, Any]) -> None:
    assert structs.encode(obj, "input") == structs.to_struct(obj)


@pytest.mark.parametrize(
    ("value", "where", "problem"),
    [
        ({"when": datetime.date(2026, 12, 1)}, "steps[1].input.when", "is a date, which JSON"),
        ({"a": [1, {"p": decimal.Decimal(1)}]}, "steps[1].input.a[1].p", "is a Decimal"),
        ({"tags": {"x"}}, "steps[1].input.tags", "is a set"),
        ({"x": float("nan")}, "steps[1].input.x", "is not a finite number"),
        ({"m": {1: "one"}}, "steps[1].input.m", "has the key 1: JSON keys are strings"),
    ],
)
def test_a_value_json_cannot_carry_is_named_by_its_place(
    value: dict[str, Any], where: str, problem: str
) -> None:
    steps = [StepSpec("a", "a.do"), StepSpec("b", "b.do", input=value)]
    with pytest.raises(InvalidArgument) as refused:
        saga_request("x", steps)
    assert str(refused.value).startswith(f"{where}: {problem}"), str(refused.value)


def test_a_date_in_the_context_says_how_to_send_it() -> None:
    with pytest.raises(InvalidArgument, match=r"^context\.day: is a date.*value\.isoformat\(\)"):
        saga_request("x", [StepSpec("a", "a.do")], context={"day": datetime.date(2026, 1, 1)})
