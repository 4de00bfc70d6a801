"""The access table (coordinator.api.auth): which role each method needs, and who a call
is by its token or certificate."""

from __future__ import annotations

import json

import pytest

from coordinator.api.auth import (
    METHOD_ROLES,
    SERVICE,
    AccessFileError,
    Role,
    entry_text,
    hash_token,
    new_token,
    parse_access,
    required_role,
)
from sagaplane.v1 import coordinator_pb2

TABLE = parse_access(
    json.dumps(
        {
            "tokens": [
                {"name": "ci", "role": "operator", "sha256": hash_token("tok-ci")},
                {"name": "ro", "role": "READER", "sha256": hash_token("tok-ro").upper()},
            ],
            "certificates": [{"subject": "billing-bot", "role": "admin"}],
        }
    ),
    "test",
)


def test_every_method_of_the_service_has_a_role() -> None:
    service = coordinator_pb2.DESCRIPTOR.services_by_name["SagaCoordinatorService"]
    assert {SERVICE + m.name for m in service.methods} == set(METHOD_ROLES)
    assert required_role(SERVICE + "GetSaga") is Role.READER
    assert required_role(SERVICE + "Compensate") is Role.OPERATOR
    assert required_role(SERVICE + "ResolveCompensation") is Role.ADMIN
    assert required_role(SERVICE + "SomethingNew") is Role.ADMIN  # default-deny
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_tokens_and_certificates_name_their_callers() -> None:
    assert TABLE.by_token("tok-ci") is not None
    assert TABLE.by_token("tok-ci").name == "ci"  # type: ignore[union-attr]
    assert TABLE.by_token("tok-ro").role is Role.READER  # type: ignore[union-attr]
    assert TABLE.by_token("tok-c") is None
    assert TABLE.by_token("") is None
    assert TABLE.by_certificate("CN=billing-bot,O=Shop", "billing-bot").role is Role.ADMIN  # type: ignore[union-attr]
    assert TABLE.by_certificate("CN=x", "x") is None


def test_a_new_token_and_its_entry_parse_back() -> None:
    token = new_token()
    assert token.startswith("sp_") and len(token) > 40 and token != new_token()
    table = parse_access("tokens:\n" + entry_text("ops team", Role.ADMIN, token) + "\n", "new")
    found = table.by_token(token)
    assert found is not None and found.name == "ops team" and found.role is Role.ADMIN


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "must be a mapping"),
        ("tokens: {a: 1}", "`tokens` must be a list of mappings"),
        ("certificates: [{role: reader}]", "certificates[0].subject: is required"),
        (
            "certificates: [{subject: a, role: reader}, {subject: a, role: admin}]",
            "given twice",
        ),
    ],
)
def test_bad_access_files_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(AccessFileError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_access(text, "f")


def test_an_empty_file_lets_nobody_in() -> None:
    table = parse_access("", "empty")
    assert table.by_token("anything") is None
    assert table.by_certificate("CN=a", "a") is None
