"""The one duration parser, and saga files' field names and durations (sagaplane.jsonform)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sagaplane.client import parse_start_request
from sagaplane.durations import FORMS, parse_duration
from sagaplane.errors import InvalidArgument


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("10s", 10), ("1m30s", 90), ("10 seconds", 10), ("1.5", 1.5), (10, 10), (1.5, 1.5),
        ("2h", 7200), ("1d", 86400), ("500ms", 0.5), ("1 hour 30 minutes", 5400),
        ("1.500s", 1.5), (" 15m ", 900), ("0", 0), (timedelta(minutes=2), 120),
    ],
)  # fmt: skip
def test_the_common_forms_are_accepted(written: str | float, seconds: float) -> None:
    assert parse_duration(written) == timedelta(seconds=seconds)


@pytest.mark.parametrize("written", ["10 sekunden", "soon", "", "10s later", "s", "1e400", True])
def test_anything_else_says_which_forms_are_accepted(written: str | bool) -> None:
    with pytest.raises(ValueError, match="is not a duration") as error:
        parse_duration(written)
    assert FORMS in str(error.value)


def test_negative_and_endless_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration("-3s")
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-1)
    with pytest.raises(ValueError, match="not a finite duration"):
        parse_duration(float("inf"))
    with pytest.raises(ValueError, match="too long"):
        parse_duration(1e300)


def test_every_duration_field_of_a_saga_file_takes_the_common_forms() -> None:
    request = parse_start_request(
        {
            "name": "x",
            "timeout": "10 seconds",
            "step_timeout": 5,
            "steps": [
                {
                    "name": "a",
                    "action": "a.do",
                    "timeout": "1m30s",
                    "retry_policy": {"initial_interval": "500ms", "max_interval": 2.5},
                    # Free-form JSON is left alone, whatever its keys.
                    "input": {"timeout": "whenever", "stepz": 1},
                }
            ],
        }
    )
    assert request.timeout.ToTimedelta() == timedelta(seconds=10)
    assert request.step_timeout.ToTimedelta() == timedelta(seconds=5)
    step = request.steps[0]
    assert step.timeout.ToTimedelta() == timedelta(seconds=90)
    assert step.retry_policy.initial_interval.ToTimedelta() == timedelta(milliseconds=500)
    assert step.retry_policy.max_interval.ToTimedelta() == timedelta(seconds=2.5)
    assert step.input.fields["timeout"].string_value == "whenever"


def test_a_bad_duration_names_its_place_and_the_forms() -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_start_request({"name": "x", "steps": [{"name": "a", "timeout": "10 sekunden"}]})
    assert error.value.message == f"steps[0].timeout: '10 sekunden' is not a duration; use {FORMS}"
    assert "invalid literal" not in error.value.message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "stepz": []}, "stepz: no such field; did you mean steps?"),
        ({"name": "x", "step-timeout": "1s"},
         "step-timeout: no such field; did you mean step_timeout?"),
        ({"name": "x", "IdempotencyKey": "k"}, "did you mean idempotency_key?"),
        ({"name": "x", "steps": [{"name": "a"}, {"name": "b", "retry": {}}]},
         "steps[1].retry: no such field; did you mean retry_policy?"),
        ({"name": "x", "steps": [{"name": "a", "depends": ["b"]}]}, "did you mean depends_on?"),
        ({"name": "x", "steps": [{"name": "a", "retry_policy": {"attempts": 3}}]},
         "steps[0].retry_policy.attempts: no such field; did you mean max_attempts?"),
    ],
)  # fmt: skip
def test_an_unknown_field_names_the_snake_case_spelling(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_start_request(data)
    assert message in error.value.message
    assert "camel" not in error.value.message and "Available Fields" not in error.value.message


def test_an_unknown_field_like_no_other_lists_the_fields() -> None:
    with pytest.raises(InvalidArgument) as error:
        parse_start_request({"name": "x", "owner": "me"})
    assert error.value.message == (
        "owner: no such field (the fields are: name, steps, context, idempotency_key, "
        "retry_policy, compensation_retry_policy, step_timeout, timeout)"
    )


def test_protobufs_camel_case_names_still_work() -> None:
    request = parse_start_request({"name": "x", "stepTimeout": "2s", "idempotencyKey": "k"})
    assert (request.step_timeout.seconds, request.idempotency_key) == (2, "k")
