"""The coordinator over TLS and mTLS, seen from SagaClient, the CLI and grpcurl; and its
refusal to serve plaintext beyond loopback (issue 17, item 1)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.app import Coordinator
from coordinator.config import ConfigError, is_loopback
from helpers.certs import Authority, Pair
from helpers.cli import sagaplane
from helpers.coordinators import coordinator_settings
from sagaplane import CoordinatorUnavailable, SagaClient, tls_credentials
from sagaplane.testing import free_port

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
STEPS = [{"name": "create", "action": "orders.create", "compensation": "orders.delete"}]


@dataclass(frozen=True)
class Certificates:
    ca: Authority
    server: Pair
    client: Pair
    """Signed by ``ca``, common name ``billing-bot``."""
    stranger: Pair
    """A client certificate of another CA."""
    other_ca: Authority


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("certs")
    ca = Authority.create(folder, "ca")
    other = Authority.create(folder, "other")
    return Certificates(
        ca=ca,
        server=ca.issue("localhost", server=True),
        client=ca.issue("billing-bot", server=False),
        stranger=other.issue("billing-bot", server=False),
        other_ca=other,
    )


@pytest.fixture
async def tls_coordinator(
    database_url: str, amqp_url: str, certs: Certificates
) -> AsyncIterator[Coordinator]:
    settings = coordinator_settings(
        database_url, amqp_url, tls_cert=str(certs.server.cert), tls_key=str(certs.server.key)
    )
    async with Coordinator(settings) as running:
        yield running


@pytest.fixture
async def mtls_coordinator(
    database_url: str, amqp_url: str, certs: Certificates
) -> AsyncIterator[Coordinator]:
    settings = coordinator_settings(
        database_url,
        amqp_url,
        tls_cert=str(certs.server.cert),
        tls_key=str(certs.server.key),
        tls_client_ca=str(certs.ca.pem),
    )
    async with Coordinator(settings) as running:
        yield running


async def reachable(address: str, **kwargs: Any) -> bool:
    async with SagaClient(address, timeout=5, **kwargs) as client:
        try:
            return await client.health() == "SERVING"
        except CoordinatorUnavailable:
            return False


async def test_tls_serves_a_client_that_trusts_the_ca_and_no_other(
    tls_coordinator: Coordinator, certs: Certificates
) -> None:
    address = f"127.0.0.1:{tls_coordinator.port}"
    trusted = tls_credentials(certs.ca.pem)
    async with SagaClient(address, credentials=trusted) as client:
        saga = await client.start_saga("order.place", STEPS)
        assert (await client.get_saga(saga.id)).id == saga.id
    # Plaintext, and TLS trusting another CA: the handshake fails, nothing is served.
    assert not await reachable(address)
    assert not await reachable(address, credentials=tls_credentials(certs.other_ca.pem))


async def test_tls_to_a_list_of_replicas_still_checks_the_server_name(
    tls_coordinator: Coordinator, certs: Certificates
) -> None:
    """A list target (here the one coordinator twice: the client cannot tell) is checked
    against one name: the list's one host, or the server name given; never none."""
    address = f"127.0.0.1:{tls_coordinator.port}"
    replicas = f"{address},{address}"
    trusted = tls_credentials(certs.ca.pem)
    async with SagaClient(replicas, credentials=trusted) as client:
        saga = await client.start_saga("order.place", STEPS)
        assert (await client.get_saga(saga.id)).id == saga.id
    # The certificate names localhost too; and a name it does not carry fails.
    assert await reachable(replicas, credentials=trusted, server_name="localhost")
    assert not await reachable(replicas, credentials=trusted, server_name="evil.example")


async def test_mtls_requires_a_client_certificate_of_the_ca(
    mtls_coordinator: Coordinator, certs: Certificates
) -> None:
    address = f"127.0.0.1:{mtls_coordinator.port}"
    ca = str(certs.ca.pem)
    assert not await reachable(address, credentials=tls_credentials(ca))
    stranger = tls_credentials(ca, cert=certs.stranger.cert, key=certs.stranger.key)
    assert not await reachable(address, credentials=stranger)
    known = tls_credentials(ca, cert=certs.client.cert, key=certs.client.key)
    assert await reachable(address, credentials=known)


async def test_the_cli_over_tls_and_mtls(
    mtls_coordinator: Coordinator, certs: Certificates, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{mtls_coordinator.port}"
    saga_file = tmp_path / "saga.json"
    saga_file.write_text(json.dumps({"name": "order.place", "steps": STEPS}))
    mtls = ["--tls-ca", str(certs.ca.pem), "--client-cert", str(certs.client.cert)]
    mtls += ["--client-key", str(certs.client.key)]
    started = await sagaplane("start", str(saga_file), "--json", "--coordinator", address, *mtls)
    saga_id = started.json()["id"]
    # The same settings from the environment.
    got = await sagaplane(
        "get",
        saga_id,
        "--json",
        SAGAPLANE_COORDINATOR=address,
        SAGAPLANE_TLS_CA=str(certs.ca.pem),
        SAGAPLANE_CLIENT_CERT=str(certs.client.cert),
        SAGAPLANE_CLIENT_KEY=str(certs.client.key),
    )
    assert got.json()["state"] == "SAGA_STATE_STARTED"
    # Without a client certificate, the handshake fails: the coordinator cannot be reached.
    refused = await sagaplane(
        "get", saga_id, "--coordinator", address, "--tls-ca", str(certs.ca.pem)
    )
    assert refused.status == 3, refused.err
    # Replicas by IP: the server name to check is the list's host, or --tls-server-name.
    replicas = f"{address},{address}"
    both = await sagaplane("get", saga_id, "--coordinator", replicas, *mtls)
    assert both.status == 0, both.err
    named = ["--tls-server-name", "localhost"]
    assert (await sagaplane("get", saga_id, "--coordinator", replicas, *mtls, *named)).status == 0
    wrong = await sagaplane(
        "get", saga_id, "--coordinator", replicas, *mtls, SAGAPLANE_TLS_SERVER_NAME="evil.example"
    )
    assert wrong.status == 3, wrong.err
    half = await sagaplane("get", saga_id, "--coordinator", address, "--client-cert", "x.pem")
    assert half.status == 2
    assert "--client-cert and --client-key" in half.err


async def grpcurl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        GRPCURL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not os.access(GRPCURL, os.X_OK), reason="grpcurl is not installed")
async def test_grpcurl_with_the_ca_and_a_client_certificate(
    mtls_coordinator: Coordinator, certs: Certificates
) -> None:
    address = f"127.0.0.1:{mtls_coordinator.port}"
    ca = ["-cacert", str(certs.ca.pem)]
    mine = [*ca, "-cert", str(certs.client.cert), "-key", str(certs.client.key)]
    code, out, err = await grpcurl(*mine, address, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}
    code, out, _ = await grpcurl(*mine, address, "list")
    assert "sagaplane.v1.SagaCoordinatorService" in out.split()
    # Plaintext, no CA, no client certificate: refused in the handshake.
    for refused in ([*ca, "-plaintext"], [], ca):
        # A refused handshake is retried by grpcurl until its connect timeout (10 s by
        # default): 2 s is plenty on loopback.
        code, _, err = await grpcurl(
            "-connect-timeout", "2", *refused, address, "grpc.health.v1.Health/Check"
        )
        assert code != 0, refused
        assert "Failed to dial" in err or "handshake" in err or "certificate" in err, err


async def test_plaintext_beyond_loopback_refuses_to_start(database_url: str, amqp_url: str) -> None:
    port = free_port()
    refused = await sagaplane("serve", "--listen", f"0.0.0.0:{port}", "--no-migrate")
    assert refused.status == 2
    assert f"refusing to serve plaintext gRPC on 0.0.0.0:{port}" in refused.err
    assert "--tls-cert" in refused.err and "--insecure" in refused.err
    # In-process the same: nothing was bound, nothing connected.
    settings = coordinator_settings(database_url, amqp_url, listen=f"[::]:{port}")
    with pytest.raises(ConfigError, match="not a loopback address"):
        async with Coordinator(settings):
            pass
    # Told --insecure, it serves.
    insecure = coordinator_settings(database_url, amqp_url, listen=f"0.0.0.0:{port}", insecure=True)
    async with Coordinator(insecure) as running:
        assert await reachable(f"127.0.0.1:{running.port}")


async def test_tls_settings_that_do_not_fit_are_refused(
    database_url: str, amqp_url: str, certs: Certificates, tmp_path: Path
) -> None:
    cert, key = str(certs.server.cert), str(certs.server.key)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tls_cert": cert}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": str(certs.ca.pem)}, "--tls-client-ca (mTLS) needs TLS"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "none.key")}, "cannot read the TLS key"),
    ]
    cases.append(
        (
            {"tls_cert": cert, "tls_key": key, "http_listen": "127.0.0.1:0"},
            "--http-listen cannot be used with --tls-cert yet",
        )
    )
    cases.append(({"http_listen": "0.0.0.0:0"}, "refusing to serve the web page on 0.0.0.0:0"))
    (tmp_path / "bad.pem").write_text("not a certificate")
    cases.append(({"tls_cert": str(tmp_path / "bad.pem"), "tls_key": key}, "not PEM"))
    for overrides, message in cases:
        settings = coordinator_settings(database_url, amqp_url, **overrides)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            async with Coordinator(settings):
                pass


def test_which_addresses_are_loopback() -> None:
    for address in ("127.0.0.1:50051", "127.8.0.1:1", "[::1]:50051", "localhost:50051"):
        assert is_loopback(address), address
    for address in ("0.0.0.0:50051", "[::]:1", ":50051", "10.0.0.5:1", "example.com:1"):
        assert not is_loopback(address), address
