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
from sagaplane import RetryPolicy, SagaClient, StepSpec
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


class Traced:
    """A coordinator and the participants alpha and beta as processes, each writing its
    spans to a file of its own; and the test's own tracer, for the caller's span."""

    def __init__(
        self,
        database_url: str,
        amqp_url: str,
        participant_urls: dict[str, str],
        tmp_path: Path,
        beta_args: list[str],
    ) -> None:
        self.files = {n: tmp_path / f"{n}.jsonl" for n in ("coordinator", "alpha", "beta")}
        self.coordinator = CoordinatorProcess(database_url, amqp_url, port=free_port())
        self.participants = {
            service: Child(
                service,
                [sys.executable, PARTICIPANT, service, f"{service}.run"]
                + (beta_args if service == "beta" else []),
                env={
                    **(self.coordinator.env or {}),
                    "SAGAPLANE_DATABASE_URL": url,
                    **_tracing_env(self.files[service], service),
                },
                tail_lines=400,
            )
            for service, url in participant_urls.items()
        }
        self.caller = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.caller))

    async def start_coordinator(self) -> None:
        await self.coordinator.start(_tracing_env(self.files["coordinator"], "coordinator"))

    async def __aenter__(self) -> Traced:
        await self.start_coordinator()
        for service, child in self.participants.items():
            await child.start()
            await _until_line(child, f"participant {service} consuming")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Gracefully: each process exports what it still buffers as it exits.
        for child in self.participants.values():
            await child.stop()
        await self.coordinator.terminate()

    def root(self) -> Any:
        """The caller's span (once ended)."""
        [root] = self.caller.get_finished_spans()
        assert root.context is not None
        return root

    def spans(self) -> dict[str, dict[str, Any]]:
        """Every process's spans by name, checked to be one trace under the caller's span."""
        root = self.root()
        spans = _spans(*self.files.values())
        ids = {s["context"]["span_id"] for s in spans} | {f"0x{root.context.span_id:016x}"}
        assert {s["context"]["trace_id"] for s in spans} == {f"0x{root.context.trace_id:032x}"}
        orphans = [s["name"] for s in spans if s["parent_id"] not in ids]
        assert not orphans, f"spans whose parent is nowhere: {orphans}"
        by_name = {s["name"]: s for s in spans}
        assert len(by_name) == len(spans), sorted(s["name"] for s in spans)
        start = by_name["/sagaplane.v1.SagaCoordinatorService/StartSaga"]
        assert start["parent_id"] == f"0x{root.context.span_id:016x}"
        return by_name


def _under(child: dict[str, Any], parent: dict[str, Any]) -> bool:
    return bool(child["parent_id"] == parent["context"]["span_id"])


async def test_one_trace_for_the_whole_saga_through_a_coordinator_restart(
    database_url: str, amqp_url: str, participant_urls: dict[str, str], tmp_path: Path
) -> None:
    hold = tmp_path / "beta-may-finish"
    args = (database_url, amqp_url, participant_urls, tmp_path)
    async with Traced(*args, beta_args=["--hold", str(hold)]) as traced:
        coordinator, files = traced.coordinator, traced.files
        async with SagaClient(coordinator.address) as client:
            with traced.provider.get_tracer("test").start_as_current_span("checkout"):
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
            assert started["trace_id"] == f"{traced.root().context.trace_id:032x}"
            # The first step's reply applied (and "charge" dispatched, in the same
            # transaction): the coordinator dies with the second step in flight.
            await _until_span(files["coordinator"], "step reserve", coordinator)
            await _until_line(traced.participants["beta"], "running beta.run")
            killed_at = time.time_ns()
            await coordinator.kill()
            await traced.start_coordinator()
            hold.touch()
            done = await client.wait(saga.id, timeout=WAIT)
            assert done.state == "completed", done

    spans = traced.spans()
    start = spans["/sagaplane.v1.SagaCoordinatorService/StartSaga"]
    # Each step attempt under the saga's StartSaga span; each handler under its step.
    reserve, charge = spans["step reserve"], spans["step charge"]
    assert _under(reserve, start) and _under(charge, start)
    assert _under(spans["execute alpha.run"], reserve)
    assert _under(spans["execute beta.run"], charge)
    assert spans["execute beta.run"]["resource"]["attributes"]["service.name"] == "beta"
    assert charge["attributes"]["sagaplane.saga_id"] == saga.id
    assert charge["attributes"]["sagaplane.attempt"] == 1
    # "charge" was dispatched by the first coordinator and closed by the second.
    assert _ns(charge["start_time"]) < killed_at < _ns(charge["end_time"])

    # The participants' JSON log lines about the command carry the saga's fields and trace.
    beta = traced.participants["beta"].tail(400).splitlines()
    lines = [json.loads(line) for line in beta if line.startswith("{")]
    [running] = [line for line in lines if line["message"] == "running beta.run"]
    assert running["saga_id"] == saga.id
    assert running["step"] == "charge"
    assert running["attempt"] == 1
    assert running["trace_id"] == f"{traced.root().context.trace_id:032x}"


async def test_a_failed_step_and_its_compensation_are_in_the_trace(
    database_url: str, amqp_url: str, participant_urls: dict[str, str], tmp_path: Path
) -> None:
    args = (database_url, amqp_url, participant_urls, tmp_path)
    async with (
        Traced(*args, beta_args=["--fail"]) as traced,
        SagaClient(traced.coordinator.address) as client,
    ):
        with traced.provider.get_tracer("test").start_as_current_span("checkout"):
            saga = await client.start_saga(
                "traced.order",
                [
                    StepSpec(name="reserve", action="alpha.run", compensation="alpha.run.undo"),
                    StepSpec(name="charge", action="beta.run"),
                ],
            )
        done = await client.wait(saga.id, timeout=WAIT)
        assert done.state == "compensated", done

    spans = traced.spans()
    start = spans["/sagaplane.v1.SagaCoordinatorService/StartSaga"]
    charge, undo = spans["step charge"], spans["compensate reserve"]
    assert _under(charge, start) and _under(undo, start)
    assert charge["status"]["status_code"] == "ERROR"
    assert "Declined" in charge["status"]["description"]
    assert spans["execute beta.run"]["status"]["status_code"] == "ERROR"
    assert _under(spans["compensate alpha.run.undo"], undo)
    assert undo["attributes"]["sagaplane.action"] == "alpha.run.undo"


def _ns(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e9)


async def test_an_unanswered_attempt_ends_at_its_timer(
    database_url: str, amqp_url: str, participant_urls: dict[str, str], tmp_path: Path
) -> None:
    args = (database_url, amqp_url, participant_urls, tmp_path)
    async with (
        Traced(*args, beta_args=[]) as traced,
        SagaClient(traced.coordinator.address) as client,
    ):
        # beta is gone: its queue keeps the command, and nobody answers it.
        await traced.participants["beta"].stop()
        with traced.provider.get_tracer("test").start_as_current_span("checkout"):
            saga = await client.start_saga(
                "traced.order",
                [
                    StepSpec(name="reserve", action="alpha.run", compensation="alpha.run.undo"),
                    StepSpec(
                        name="charge",
                        action="beta.run",
                        timeout=1,
                        retry_policy=RetryPolicy(max_attempts=1),
                    ),
                ],
            )
        done = await client.wait(saga.id, timeout=WAIT)
        assert done.state == "compensated", done

    spans = traced.spans()
    start = spans["/sagaplane.v1.SagaCoordinatorService/StartSaga"]
    charge, timer = spans["step charge"], spans["timer charge"]
    assert _under(charge, start) and _under(timer, start)
    assert charge["status"] == {"status_code": "ERROR", "description": "timed out"}
    assert "execute beta.run" not in spans
    assert _under(spans["compensate alpha.run.undo"], spans["compensate reserve"])
