"""The Node.js and Go quickstarts against a coordinator that requires mTLS and a token
(issue 17): the same tour as test_polyglot_clients over TLS with a client certificate
and a bearer token, and the refusal they report without the token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from polyglot_tools import go_quickstart, json_lines, node_quickstart, run

from coordinator.api.auth import hash_token
from coordinator.app import Coordinator
from helpers.certs import Authority, Pair
from helpers.coordinators import coordinator_settings
from sagaplane import SagaClient, tls_credentials

__all__ = ["go_quickstart", "node_quickstart"]  # fixtures, imported for pytest

TOKEN = "tok-polyglot"


@pytest.fixture
async def secured(
    database_url: str, amqp_url: str, tmp_path: Path
) -> AsyncIterator[tuple[Coordinator, Authority, Pair]]:
    ca = Authority.create(tmp_path / "certs")
    server = ca.issue("localhost", server=True)
    client = ca.issue("quickstart", server=False)
    access = tmp_path / "access.json"
    entry = {"name": "polyglot", "role": "operator", "sha256": hash_token(TOKEN)}
    access.write_text(json.dumps({"tokens": [entry]}))
    settings = coordinator_settings(
        database_url,
        amqp_url,
        tls_cert=str(server.cert),
        tls_key=str(server.key),
        tls_client_ca=str(ca.pem),
        auth_tokens=str(access),
    )
    async with Coordinator(settings) as running:
        yield running, ca, client


async def tour(
    command: list[str | Path], flags: dict[str, str], secured: tuple[Coordinator, Authority, Pair]
) -> None:
    coordinator, ca, client = secured
    tls = {"tls-ca": str(ca.pem), "tls-cert": str(client.cert), "tls-key": str(client.key)}
    args = [*command, flags["address"], f"127.0.0.1:{coordinator.port}"]
    for name, value in tls.items():
        args += [flags["prefix"] + name, value]
    cwd = Path(command[-1]).parent
    code, _, err = await run(*args, cwd=cwd, check=False)
    assert code == 1
    assert "a known token is required" in err, err
    _, out, _ = await run(*args, flags["prefix"] + "token", TOKEN, flags["compensate"], cwd=cwd)
    ops = json_lines(out)
    saga_id = ops["start"]["saga"]["id"]
    assert ops["compensate"]["saga"]["state"] == "SAGA_STATE_COMPENSATING"
    credentials = tls_credentials(ca.pem, cert=client.cert, key=client.key)
    async with SagaClient(
        f"127.0.0.1:{coordinator.port}", credentials=credentials, token=TOKEN
    ) as python:
        history = (await python.get_saga(saga_id, include_history=True)).history
    callers = {e.event: e.caller for e in history}
    assert callers["saga_started"] == callers["compensation_requested"] == "polyglot"


async def test_node_quickstart_over_mtls_with_a_token(
    secured: tuple[Coordinator, Authority, Pair], node_quickstart: Path, delivered: None
) -> None:
    flags = {"address": "--address", "prefix": "--", "compensate": "--compensate"}
    await tour(["node", node_quickstart], flags, secured)


async def test_go_quickstart_over_mtls_with_a_token(
    secured: tuple[Coordinator, Authority, Pair], go_quickstart: Path, delivered: None
) -> None:
    flags = {"address": "-address", "prefix": "-", "compensate": "-compensate"}
    await tour([go_quickstart], flags, secured)
