"""The security phase's checks that each variant was what its name says
(bench/security.py); the runs themselves are `python -m bench`'s."""

from __future__ import annotations

from typing import Any

from bench import security

ON_PROBES = {
    "plaintext, no token": "refused: UNAVAILABLE",
    "TLS, no token": "refused: UNAUTHENTICATED",
    "TLS, the token": "answered",
}


def _run(probes: dict[str, str], signed: int, rows: int = 1000, dead: int = 0) -> dict[str, Any]:
    return {
        "probes": probes,
        "signed_rows": {
            "coordinator": {"rows": rows, "signed": signed},
            "orders": {"rows": rows, "signed": signed},
        },
        "dead_letters": dead,
    }


def test_on_and_off_as_named() -> None:
    assert security.verified("on", _run(ON_PROBES, signed=1000)) == []
    assert security.verified("off", _run({"plaintext, no token": "answered"}, signed=0)) == []


def test_an_on_run_that_answers_plaintext_or_has_unsigned_rows_is_not_on() -> None:
    plain = {**ON_PROBES, "plaintext, no token": "answered", "TLS, no token": "answered"}
    problems = security.verified("on", _run(plain, signed=999))
    assert problems == [
        "GetSaga plaintext, no token: answered",
        "GetSaga TLS, no token: answered",
        "coordinator: 999 of 1000 rows signed",
        "orders: 999 of 1000 rows signed",
    ]


def test_an_off_run_with_signed_rows_or_dead_letters_or_no_rows_is_not_off() -> None:
    run = _run({"plaintext, no token": "refused: UNAVAILABLE"}, signed=5, dead=2)
    assert security.verified("off", run) == [
        "GetSaga plaintext, no token: refused: UNAVAILABLE",
        "coordinator: 5 of 1000 rows signed",
        "orders: 5 of 1000 rows signed",
        "2 messages dead-lettered",
    ]
    # Nothing in the outbox proves nothing either way.
    empty = _run({"plaintext, no token": "answered"}, signed=0, rows=0)
    assert "coordinator: 0 of 0 rows signed" in security.verified("off", empty)


def test_an_on_run_whose_checks_did_not_run_is_not_on() -> None:
    assert security.verified("on", {}) == [
        "GetSaga plaintext, no token: not tried",
        "GetSaga TLS, no token: not tried",
        "GetSaga TLS, the token: not tried",
        "no outbox rows sampled",
    ]
