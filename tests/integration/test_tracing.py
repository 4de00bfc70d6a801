"""One trace per saga, across the coordinator and two participant processes, through a
coordinator restart (issue 20, item 2).

Every process writes its spans to a file of its own (SAGAPLANE_TRACES_FILE); the test
is the StartSaga caller, with a span of its own (its own in-memory OpenTelemetry
provider) that SagaClient sends as the call's ``traceparent``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the [otel] extra is not installed")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from helpers.database import create_database, drop_database, server_url, unique_name
from helpers.processes import CoordinatorProcess, free_port
from sagaplane import SagaClient, StepSpec
from sagaplane.testing import Child

PARTICIPANT = str(Path(__file__).parents[1] / "helpers" / "traced_participant.py")
WAIT = 30.0


def _tracing_env(path: Path, service: str) -> dict[str, str]:
    # Exports every 50 ms: the test waits for spans in the files, not for a flush.
    return {
        "SAGAPLANE_TRACES_FILE": str(path),
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "SAGAPLANE_LOG_FORMAT": "json",
    }


def _spans(*paths: Path) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        if path.exists():
            found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


async def _until_span(path: Path, name: str, child: Child) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        for span in _spans(path):
            if span["name"] == name:
                return span
        assert child.alive, f"{child.name} died:\n{child.tail()}"
        if time.monotonic() > deadline:
            pytest.fail(f"no span {name!r} in {path} after {WAIT}s:\n{child.tail()}")
        await asyncio.sleep(0.05)


async def _until_line(child: Child, text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in child.tail(200):
        assert child.alive, f"{child.name} died:\n{child.tail()}"
        if time.monotonic() > deadline:
            pytest.fail(f"{child.name} never said {text!r}:\n{child.tail()}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def participant_urls() -> AsyncIterator[dict[str, str]]:
    names = {service: unique_name(f"sagaplane_{service}") for service in ("alpha", "beta")}
    try:
        for name in names.values():
            await create_database(name)
        yield {service: server_url(name) for service, name in names.items()}
    finally:
        for name in names.values():
            await drop_database(name)


async def test_one_trace_for_the_whole_saga_through_a_coordinator_restart(
    database_url: str, amqp_url: str, participant_urls: dict[str, str], tmp_path: Path
) -> None:
    files = {name: tmp_path / f"{name}.jsonl" for name in ("coordinator", "alpha", "beta")}
    hold = tmp_path / "beta-may-finish"
    coordinator = CoordinatorProcess(database_url, amqp_url, port=free_port())
    participants = {
        service: Child(
            service,
            [sys.executable, PARTICIPANT, service, f"{service}.run"]
            + ([str(hold)] if service == "beta" else []),
            env={
                **coordinator.env,  # type: ignore[dict-item]
                "SAGAPLANE_DATABASE_URL": url,
                **_tracing_env(files[service], service),
            },
            tail_lines=400,
        )
        for service, url in participant_urls.items()
    }
    caller = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(caller))
    try:
        await coordinator.start(_tracing_env(files["coordinator"], "coordinator"))
        for service, child in participants.items():
            await child.start()
            await _until_line(child, f"participant {service} consuming")

        async with SagaClient(coordinator.address) as client:
            with provider.get_tracer("test").start_as_current_span("checkout"):
                saga = await client.start_saga(
                    "traced.order",
                    [
                        StepSpec(name="reserve", action="alpha.run", compensation="alpha.run.undo"),
                        StepSpec(name="charge", action="beta.run", timeout=120),
                    ],
                )
            # The coordinator's JSON line about the saga names it, in its trace.
            await _until_line(coordinator, f"saga {saga.id} started")
            [started] = [
                json.loads(line)
                for line in coordinator.tail(40).splitlines()
                if f"saga {saga.id} started" in line
            ]
            assert started["saga_id"] == saga.id
            [root] = caller.get_finished_spans()
            assert root.context is not None
            assert started["trace_id"] == f"{root.context.trace_id:032x}"
            # The first step's reply applied (and "charge" dispatched, in the same
            # transaction): the coordinator dies with the second step in flight.
            await _until_span(files["coordinator"], "step reserve", coordinator)
            await _until_line(participants["beta"], "running beta.run")
            killed_at = time.time_ns()
            await coordinator.kill()
            await coordinator.start(_tracing_env(files["coordinator"], "coordinator"))
            hold.touch()
            done = await client.wait(saga.id, timeout=WAIT)
            assert done.state == "completed", done
    finally:
        for child in participants.values():
            await child.stop()
        await coordinator.terminate()

    trace_id = f"0x{root.context.trace_id:032x}"
    spans = _spans(*files.values())
    by_name = {s["name"]: s for s in spans}
    ids = {s["context"]["span_id"] for s in spans} | {f"0x{root.context.span_id:016x}"}

    # One trace for the whole saga, rooted at the caller's span.
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}
    assert all(s["parent_id"] in ids for s in spans), "a span whose parent is nowhere"
    start = by_name["/sagaplane.v1.SagaCoordinatorService/StartSaga"]
    assert start["parent_id"] == f"0x{root.context.span_id:016x}"
    # Each step attempt under the saga's StartSaga span; each handler under its step.
    reserve, charge = by_name["step reserve"], by_name["step charge"]
    assert reserve["parent_id"] == charge["parent_id"] == start["context"]["span_id"]
    assert by_name["execute alpha.run"]["parent_id"] == reserve["context"]["span_id"]
    assert by_name["execute beta.run"]["parent_id"] == charge["context"]["span_id"]
    assert by_name["execute beta.run"]["resource"]["attributes"]["service.name"] == "beta"
    assert charge["attributes"]["sagaplane.saga_id"] == saga.id
    assert charge["attributes"]["sagaplane.attempt"] == 1
    # "charge" was dispatched by the first coordinator and closed by the second.
    assert _ns(charge["start_time"]) < killed_at < _ns(charge["end_time"])

    # The participants' JSON log lines about the command carry the saga's fields and trace.
    lines = [
        json.loads(line)
        for line in participants["beta"].tail(400).splitlines()
        if line.startswith("{")
    ]
    [running] = [line for line in lines if line["message"] == "running beta.run"]
    assert running["saga_id"] == saga.id
    assert running["step"] == "charge"
    assert running["attempt"] == 1
    assert f"0x{running['trace_id']}" == trace_id


def _ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)
