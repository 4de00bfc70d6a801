"""Tokens and roles (issue 17, item 2): every RPC by role, UNAUTHENTICATED and
PERMISSION_DENIED, health open, the caller's name in the history, client certificates
as callers, SIGHUP reloading the access file of a running coordinator, and the CLI's
``--token``/``SAGAPLANE_TOKEN``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.api.auth import hash_token
from coordinator.app import Coordinator
from coordinator.config import ConfigError
from helpers.certs import Authority
from helpers.cli import sagaplane
from helpers.coordinators import coordinator_settings
from helpers.processes import CoordinatorProcess
from sagaplane import (
    CoordinatorError,
    IllegalTransition,
    PermissionDenied,
    SagaClient,
    Unauthenticated,
    saga_request,
    tls_credentials,
)
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
STEPS = [{"name": "create", "action": "orders.create", "compensation": "orders.delete"}]
TOKENS = {"reader": "tok-reader", "operator": "tok-operator", "admin": "tok-admin"}
"""One token per role; the caller of each is named ``<role>-bot``."""


def access_file(path: Path, roles: dict[str, str], **extra: Any) -> Path:
    """Write an access file: ``roles`` maps a caller's name to its role; each one's
    token is ``tok-<name>``."""
    entries = [
        {"name": name, "role": role, "sha256": hash_token(f"tok-{name}")}
        for name, role in roles.items()
    ]
    path.write_text(json.dumps({"tokens": entries, **extra}))
    return path


def role_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": f"{role}-bot", "role": role, "sha256": hash_token(token)}
                    for role, token in TOKENS.items()
                ]
            }
        )
    )
    return path


@pytest.fixture
async def guarded(database_url: str, amqp_url: str, tmp_path: Path) -> AsyncIterator[Coordinator]:
    settings = coordinator_settings(
        database_url, amqp_url, auth_tokens=str(role_file(tmp_path / "access.json"))
    )
    async with Coordinator(settings) as running:
        yield running


def client(coordinator: Coordinator, token: str | None = None, **kwargs: Any) -> SagaClient:
    return SagaClient(f"127.0.0.1:{coordinator.port}", token=token, timeout=10, **kwargs)


async def first_watch(c: SagaClient, saga_id: str) -> None:
    async for _ in c.watch(saga_id):
        return


Call = Callable[[SagaClient, str], Awaitable[Any]]

CALLS: dict[str, tuple[str, Call]] = {
    "GetSaga": ("reader", lambda c, i: c.get_saga(i, include_history=True)),
    "ListActive": ("reader", lambda c, i: c.list_active()),
    "ListSagas": ("reader", lambda c, i: c.list_sagas()),
    "WatchSaga": ("reader", first_watch),
    "StartSaga": ("operator", lambda c, i: c.start_saga("order.place", STEPS)),
    "StartSagas": ("operator", lambda c, i: c.start_sagas([saga_request("order.place", STEPS)])),
    "Compensate": ("operator", lambda c, i: c.compensate(i, "by test")),
    "ResolveCompensation": (
        "admin",
        lambda c, i: c.resolve_compensation(i, "retry", "by test"),
    ),
}
ORDER = ["reader", "operator", "admin"]


async def outcome(call: Call, c: SagaClient, saga_id: str) -> str:
    try:
        await call(c, saga_id)
    except (Unauthenticated, PermissionDenied) as exc:
        return type(exc).__name__
    except IllegalTransition:
        return "allowed"  # let in, then refused by the saga's state (ResolveCompensation)
    return "allowed"


async def test_every_rpc_by_role_and_without_a_known_token(guarded: Coordinator) -> None:
    async with client(guarded, TOKENS["admin"]) as admin:
        saga_id = (await admin.start_saga("order.place", STEPS)).id
    seen: dict[tuple[str, str], str] = {}
    expected: dict[tuple[str, str], str] = {}
    callers = {**{role: TOKENS[role] for role in ORDER}, "none": None, "unknown": "tok-nobody"}
    for who, token in callers.items():
        async with client(guarded, token) as c:
            for method, (needed, call) in CALLS.items():
                seen[who, method] = await outcome(call, c, saga_id)
                if who in ("none", "unknown"):
                    expected[who, method] = "Unauthenticated"
                elif ORDER.index(who) >= ORDER.index(needed):
                    expected[who, method] = "allowed"
                else:
                    expected[who, method] = "PermissionDenied"
    assert seen == expected


async def test_denials_say_why(guarded: Coordinator) -> None:
    async with client(guarded) as nobody:
        with pytest.raises(Unauthenticated, match="Bearer"):
            await nobody.list_active()
        # Health stays open: load balancers and `sagaplane health` need no token.
        assert await nobody.health() == "SERVING"
    async with client(guarded, TOKENS["reader"]) as reader:
        with pytest.raises(PermissionDenied, match="Compensate needs the role operator"):
            await reader.compensate("01JAAAAAAAAAAAAAAAAAAAAAAA")
    # An authorization header of another scheme is no token at all.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListActive(
                coordinator_pb2.ListActiveRequest(),
                metadata=(("authorization", "Basic dXNlcjpwYXNz"),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_callers_name_is_in_the_history(guarded: Coordinator) -> None:
    async with client(guarded, TOKENS["operator"]) as operator:
        saga = await operator.start_saga("order.place", STEPS)
        await operator.compensate(saga.id, "customer cancelled")
    async with client(guarded, TOKENS["reader"]) as reader:
        history = (await reader.get_saga(saga.id, include_history=True)).history
        stream = reader.watch(saga.id)
        watched = await anext(stream)  # the saga now, with its whole history
        await stream.aclose()
    by_event = {e.event: e.caller for e in history}
    assert by_event["saga_started"] == "operator-bot"
    assert by_event["compensation_requested"] == "operator-bot"
    # The same through WatchSaga.
    assert {e.event: e.caller for e in watched.history} == by_event


async def test_a_client_certificate_is_a_caller_by_its_subject(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    ca = Authority.create(tmp_path / "certs")
    server = ca.issue("localhost", server=True)
    listed = ca.issue("billing-bot", server=False)
    unlisted = ca.issue("someone-else", server=False)
    ledger = ca.issue("ledger", server=False)
    access = access_file(
        tmp_path / "access.json",
        {"ops": "admin"},
        certificates=[
            {"subject": "billing-bot", "role": "reader", "name": "billing"},
            # The whole subject, as gRPC shows it (RFC 4514: the last RDN first).
            {"subject": "CN=ledger,O=Sagaplane tests", "role": "operator"},
        ],
    )
    settings = coordinator_settings(
        database_url,
        amqp_url,
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.pem),
        auth_tokens=str(access),
    )
    async with Coordinator(settings) as running:
        address = f"127.0.0.1:{running.port}"
        as_billing = tls_credentials(ca.pem, cert=listed.cert, key=listed.key)
        as_other = tls_credentials(ca.pem, cert=unlisted.cert, key=unlisted.key)
        async with SagaClient(address, credentials=as_other, token="tok-ops") as ops:
            saga_id = (await ops.start_saga("order.place", STEPS)).id
        async with SagaClient(address, credentials=as_billing) as billing:
            assert (await billing.get_saga(saga_id)).id == saga_id
            with pytest.raises(PermissionDenied, match="'billing' is a reader"):
                await billing.compensate(saga_id)
        as_ledger = tls_credentials(ca.pem, cert=ledger.cert, key=ledger.key)
        async with SagaClient(address, credentials=as_ledger) as by_subject:
            await by_subject.compensate(saga_id, "by the ledger")
            history = (await by_subject.get_saga(saga_id, include_history=True)).history
            assert history[-1].caller == "CN=ledger,O=Sagaplane tests"
        async with SagaClient(address, credentials=as_other) as other:
            with pytest.raises(Unauthenticated):
                await other.get_saga(saga_id)
        # A token, when sent, says who calls, whatever the certificate.
        async with SagaClient(address, credentials=as_billing, token="tok-nobody") as liar:
            with pytest.raises(Unauthenticated):
                await liar.get_saga(saga_id)


async def test_access_files_that_say_nothing_clear_are_refused_at_start(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    digest = hash_token("x")

    def one(**entry: str) -> str:
        return json.dumps({"tokens": [entry]})

    cases = {
        one(name="a", role="root", sha256=digest): "tokens[0].role",
        one(name="a", role="reader", sha256="abc"): "64 hex digits",
        one(role="reader", sha256=digest): "tokens[0].name",
        one(name="a", role="reader", sha256=digest, token="x"): "unknown keys token",
        '{"users": []}': "unknown keys users",
        "tokens: [": "not valid YAML or JSON",
    }
    path = tmp_path / "access.yaml"
    for text, message in cases.items():
        path.write_text(text)
        settings = coordinator_settings(database_url, amqp_url, auth_tokens=str(path))
        with pytest.raises(ConfigError, match=re.escape(message)):
            async with Coordinator(settings):
                pass
    settings = coordinator_settings(database_url, amqp_url, auth_tokens=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="cannot read"):
        async with Coordinator(settings):
            pass


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Until ``check()`` holds (a signal is handled when the process gets to it)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_sighup_reloads_the_access_file_of_a_running_coordinator(
    database_url: str, amqp_url: str, tmp_path: Path, delivered: None
) -> None:
    path = access_file(tmp_path / "access.yaml", {"ci": "reader", "ops": "operator"})
    process = CoordinatorProcess(database_url, amqp_url)
    await process.start({"SAGAPLANE_AUTH_TOKENS": str(path)})
    try:
        async with SagaClient(process.address, token="tok-ops") as ops:
            saga_id = (await ops.start_saga("order.place", STEPS)).id
        async with SagaClient(process.address, token="tok-ci") as ci:
            with pytest.raises(PermissionDenied):
                await ci.compensate(saga_id)
            # ci becomes an operator; ops is removed. No restart.
            access_file(path, {"ci": "operator"})
            os.kill(process.pid, signal.SIGHUP)

            async def ops_gone() -> bool:
                async with SagaClient(process.address, token="tok-ops") as gone:
                    try:
                        await gone.list_active()
                    except Unauthenticated:
                        return True
                return False

            await eventually(ops_gone)
            compensated = await ci.compensate(saga_id, "allowed now")
            assert compensated.state.value == "compensating"
            # A file that no longer parses changes nothing: ci stays an operator.
            path.write_text("tokens: [")
            mark = process.output_mark()
            os.kill(process.pid, signal.SIGHUP)

            async def reported() -> bool:
                return any("not reloaded" in line for line in process.output_since(mark))

            await eventually(reported)
            await ci.compensate(saga_id, "still allowed")
            assert process.alive
            history = (await ci.get_saga(saga_id, include_history=True)).history
            assert [e.caller for e in history if e.event == "compensation_requested"] == ["ci"]
    finally:
        await process.terminate()


async def test_the_cli_takes_a_token(guarded: Coordinator) -> None:
    address = f"127.0.0.1:{guarded.port}"
    async with client(guarded, TOKENS["operator"]) as operator:
        saga_id = (await operator.start_saga("order.place", STEPS)).id
    nobody = await sagaplane("get", saga_id, "--coordinator", address)
    assert nobody.status == 8
    assert "--token" in nobody.err and "SAGAPLANE_TOKEN" in nobody.err
    reader = await sagaplane("get", saga_id, "--coordinator", address, "--token", TOKENS["reader"])
    assert reader.status == 0, reader.err
    denied = await sagaplane(
        "compensate", saga_id, "--coordinator", address, "--token", TOKENS["reader"]
    )
    assert denied.status == 8
    assert "not allowed" in denied.err and "operator" in denied.err
    done = await sagaplane(
        "compensate", saga_id, SAGAPLANE_COORDINATOR=address, SAGAPLANE_TOKEN=TOKENS["operator"]
    )
    assert done.status == 0, done.err
    shown = await sagaplane(
        "get", saga_id, "--history", SAGAPLANE_COORDINATOR=address, SAGAPLANE_TOKEN=TOKENS["admin"]
    )
    assert "(by operator-bot)" in shown.out or "by operator-bot" in shown.out
    assert (await sagaplane("health", "--coordinator", address)).status == 0


async def grpcurl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not os.access(GRPCURL, os.X_OK), reason="grpcurl is not installed")
async def test_grpcurl_with_a_bearer_token(guarded: Coordinator) -> None:
    address = f"127.0.0.1:{guarded.port}"
    service = "sagaplane.v1.SagaCoordinatorService"

    def bearer(role: str) -> list[str]:
        return ["-plaintext", "-H", f"authorization: Bearer {TOKENS[role]}"]

    # Reflection is open (the schema only): grpcurl finds every method without a token.
    code, out, err = await grpcurl("-plaintext", address, "list")
    assert code == 0 and service in out.split(), err
    code, out, _ = await grpcurl("-plaintext", address, "grpc.health.v1.Health/Check")
    assert json.loads(out) == {"status": "SERVING"}
    request = json.dumps({"name": "order.place", "steps": STEPS})
    code, out, err = await grpcurl(
        *bearer("operator"), "-d", request, address, f"{service}/StartSaga"
    )
    assert code == 0, err
    saga_id = json.loads(out)["saga"]["id"]
    get = json.dumps({"id": saga_id, "include_history": True})
    code, _, err = await grpcurl("-plaintext", "-d", get, address, f"{service}/GetSaga")
    assert "Code: Unauthenticated" in err
    code, _, err = await grpcurl(
        *bearer("reader"), "-d", json.dumps({"id": saga_id}), address, f"{service}/Compensate"
    )
    assert "Code: PermissionDenied" in err
    code, out, err = await grpcurl(*bearer("reader"), "-d", get, address, f"{service}/GetSaga")
    assert code == 0, err
    assert json.loads(out)["saga"]["history"][0]["caller"] == "operator-bot"


def test_errors_are_coordinator_errors() -> None:
    assert issubclass(Unauthenticated, CoordinatorError)
    assert issubclass(PermissionDenied, CoordinatorError)
