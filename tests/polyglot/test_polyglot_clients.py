"""The generated Node.js and Go clients against a real coordinator.

Each runs its quickstart example (clients/node/examples, clients/go/examples) as a child
process: StartSaga, GetSaga, ListActive, Compensate. No participant is running, so the
first step's command stays in flight and Compensate finds the saga ``started``. The
answers the client printed are checked, and so is what the coordinator recorded (read
back through the Python stub), which proves the requests were encoded right.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from polyglot_tools import by_name, go_quickstart, json_lines, node_quickstart, run

from coordinator.app import Coordinator
from helpers.transitions import succeed, undo_all
from sagaplane import structs
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

__all__ = ["go_quickstart", "node_quickstart"]  # fixtures, imported for pytest

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub


async def check_tour(ops: dict[str, dict[str, Any]], stub: Stub, *, source: str) -> None:
    """The quickstart's start → get → list → compensate answers, and the recorded saga."""
    started = ops["start"]["saga"]
    saga_id = started["id"]
    assert len(saga_id) == 26
    assert started["name"] == "order.ship"
    assert started["state"] == "SAGA_STATE_STARTED"
    assert started["context"] == {"customer": "c-1", "source": source}
    steps = by_name(started["steps"])
    assert list(steps) == ["create", "ship"]
    assert steps["create"]["action"] == "orders.create"
    assert steps["create"]["compensation"] == "orders.delete"
    assert steps["create"]["input"] == {"sku": "book", "qty": 1}
    assert steps["create"]["status"] == "STEP_STATUS_STARTED"
    assert steps["ship"]["status"] == "STEP_STATUS_PENDING"
    assert steps["ship"]["dependsOn"] == ["create"]
    assert started["idempotencyKey"].startswith("quickstart-")

    got = ops["get"]["saga"]
    assert got["id"] == saga_id
    assert got["state"] == "SAGA_STATE_STARTED"
    assert got["history"][0]["event"] == "saga_started"

    assert ops["list"]["sagaIds"] == [saga_id]

    compensated = ops["compensate"]["saga"]
    assert compensated["id"] == saga_id
    assert compensated["state"] == "SAGA_STATE_COMPENSATING"
    # The pending step never runs; the one in flight is waited for.
    assert by_name(compensated["steps"])["ship"]["status"] == "STEP_STATUS_SKIPPED"

    recorded = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
    assert recorded.state == model.SAGA_STATE_COMPENSATING
    assert structs.to_dict(recorded.context) == {"customer": "c-1", "source": source}
    # Never dispatched: the reference is as the client wrote it.
    assert structs.to_dict(recorded.steps[1].input) == {
        "address": "1 Main St",
        "sku": "book",
        "order_id": "${steps.create.output.order_id}",
    }
    assert list(recorded.steps[1].depends_on) == ["create"]
    assert any(
        h.event == "compensation_requested" and h.reason.startswith("quickstart")
        for h in recorded.history
    )


async def test_node_client_starts_gets_lists_and_compensates(
    coordinator: Coordinator, stub: Stub, node_quickstart: Path, delivered: None
) -> None:
    _, out, _ = await run(
        "node",
        node_quickstart,
        "--address",
        f"127.0.0.1:{coordinator.port}",
        "--compensate",
        cwd=node_quickstart.parent,
    )
    await check_tour(json_lines(out), stub, source="node")


async def test_go_client_starts_gets_lists_and_compensates(
    coordinator: Coordinator, stub: Stub, go_quickstart: Path, delivered: None
) -> None:
    _, out, _ = await run(
        go_quickstart,
        "-address",
        f"127.0.0.1:{coordinator.port}",
        "-compensate",
        cwd=go_quickstart.parent,
    )
    await check_tour(json_lines(out), stub, source="go")


async def test_node_and_go_clients_report_grpc_errors(
    node_quickstart: Path, go_quickstart: Path
) -> None:
    """Nothing listens on the address: each client fails with UNAVAILABLE, exit status 1."""
    dead = "127.0.0.1:1"
    code, _, err = await run(
        "node", node_quickstart, "--address", dead, cwd=node_quickstart.parent, check=False
    )
    assert code == 1 and "code 14" in err, err  # 14: UNAVAILABLE
    code, _, err = await run(go_quickstart, "-address", dead, cwd=go_quickstart.parent, check=False)
    assert code == 1 and "Unavailable" in err, err


async def test_node_client_starts_a_batch_and_reads_the_bad_sagas_of_a_refused_one(
    coordinator: Coordinator, stub: Stub, node_quickstart: Path
) -> None:
    """clients/node/examples/batch.ts: StartSagas, and a refused batch's BadRequest details
    read by the Node.js client (fieldViolations)."""
    batch = node_quickstart.parent / "batch.js"
    address = ("--address", f"127.0.0.1:{coordinator.port}")
    _, out, _ = await run(
        "node", batch, *address, "--count", "1000", "--bad", "617", cwd=batch.parent
    )
    refused = json_lines(out)["refused"]
    assert refused["code"] == 3  # INVALID_ARGUMENT
    assert refused["details"] == "sagas[617].steps[0].action: is required"
    assert refused["violations"] == [
        {"field": "sagas[617].steps[0].action", "description": "is required", "index": 617}
    ]
    assert not (await stub.ListActive(api.ListActiveRequest())).sagas  # nothing written

    _, out, _ = await run("node", batch, *address, "--count", "3", cwd=batch.parent)
    ids = json_lines(out)["started"]["ids"]
    assert len(set(ids)) == 3
    for row, saga_id in enumerate(ids):
        saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
        assert structs.to_dict(saga.context) == {"row": row, "source": "node"}


async def test_node_wait_for_end_follows_the_watch_stream_to_the_end(
    coordinator: Coordinator, stub: Stub, node_quickstart: Path
) -> None:
    """``waitForEnd`` (the quickstart's --wait) resolves once the saga ends, pushed over
    WatchSaga: the test ends the saga through the store while the client waits."""
    assert coordinator.store is not None
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(node_quickstart),
        "--address",
        f"127.0.0.1:{coordinator.port}",
        "--wait",
        "30",
        cwd=node_quickstart.parent,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            lines = []
            while not lines or lines[-1]["op"] != "list":
                lines.append(json.loads(await proc.stdout.readline()))
            saga_id = lines[0]["saga"]["id"]
            # The quickstart now waits. create completes (without the order_id that ship's
            # input refers to, so ship fails), then create's compensation completes.
            await succeed(coordinator.store, saga_id)
            await undo_all(coordinator.store, saga_id)
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    end = json_lines(out.decode())["end"]
    recorded = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
    assert recorded.state in (model.SAGA_STATE_COMPENSATED, model.SAGA_STATE_FAILED)
    assert end["state"] == model.SagaState.Name(recorded.state)
