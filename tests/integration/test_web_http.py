"""The operator web page over real HTTP (aiohttp's client) against a real coordinator
serving it (``http_listen``): pages, refusals, escaping, the actions' guard, the event
stream. The browser tests are in tests/acceptance/test_web.py."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest

from coordinator import engine
from coordinator.api.interceptors import ErrorMappingInterceptor
from coordinator.api.page_tokens import PageTokens
from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.app import Coordinator
from coordinator.config import add_arguments, from_args
from coordinator.engine import CommandKind
from coordinator.web import WebServer
from helpers.coordinators import coordinator_settings
from helpers.processes import CoordinatorProcess, free_port
from helpers.transitions import fail_compensation, request, succeed
from sagaplane import SagaClient
from sagaplane.v1 import coordinator_pb2_grpc

WAIT = 15.0
ACTION = {"X-Sagaplane-Request": "1"}


@pytest.fixture
async def web(database_url: str, amqp_url: str) -> AsyncIterator[Coordinator]:
    """A coordinator serving its web page on a free port."""
    settings = coordinator_settings(database_url, amqp_url, http_listen="127.0.0.1:0")
    async with Coordinator(settings) as running:
        yield running


@pytest.fixture
async def http(web: Coordinator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{web.http_port}") as session:
        yield session


@pytest.fixture
async def client(web: Coordinator) -> AsyncIterator[SagaClient]:
    async with SagaClient(f"127.0.0.1:{web.port}") as client:
        yield client


async def test_the_page_is_off_unless_asked_for(coordinator: Coordinator) -> None:
    assert coordinator.http_port is None


def test_the_flag_and_the_environment_variable() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, {"SAGAPLANE_HTTP_LISTEN": "0.0.0.0:8080"})
    assert from_args(parser.parse_args([])).http_listen == "0.0.0.0:8080"
    assert from_args(parser.parse_args(["--http-listen", ":9"])).http_listen == ":9"
    parser = argparse.ArgumentParser()
    add_arguments(parser, {})
    assert from_args(parser.parse_args([])).http_listen is None


async def test_the_list_shows_sagas_counts_and_filters(
    http: aiohttp.ClientSession, client: SagaClient, web: Coordinator
) -> None:
    first = await client.start_saga_request(request("order.place"))
    other = await client.start_saga_request(request("refund.issue"))
    async with http.get("/") as answer:  # redirected
        assert answer.status == 200
        page = await answer.text()
    assert first.id in page and other.id in page
    assert answer.headers["Content-Security-Policy"].startswith("default-src 'self'")
    async with http.get("/sagas", params={"name": "refund.issue"}) as answer:
        page = await answer.text()
    assert other.id in page and first.id not in page
    async with http.get("/sagas/live", params=[("state", "completed")]) as answer:
        live = await answer.text()
    assert "No saga matches." in live
    # Both started, counted whatever the state filter.
    assert _count(live, "started") == "2" and _count(live, "completed") == "0"


BAD_QUERIES = [
    ({"state": "sleeping"}, "state: must be one of"),
    ({"created_after": "yesterday"}, "created_after: not a date or time"),
    ({"page_size": "0"}, "page_size: must be a whole number"),
    ({"page_token": "forged"}, "page_token"),
]


async def test_bad_query_parameters_are_400_with_a_message(http: aiohttp.ClientSession) -> None:
    for path in ("/sagas", "/sagas/live"):
        for query, message in BAD_QUERIES:
            async with http.get(path, params=query) as answer:
                assert answer.status == 400, query
                text = await answer.text()
            assert message in text
            assert "Traceback" not in text


async def test_an_unknown_saga_is_404(
    http: aiohttp.ClientSession,
) -> None:
    async with http.get("/sagas/01JDZZZZZZZZZZZZZZZZZZZZZZ") as answer:
        assert answer.status == 404
        assert "Traceback" not in await answer.text()
    async with http.get("/sagas/01JDZZZZZZZZZZZZZZZZZZZZZZ/events") as answer:
        assert answer.status == 404
    async with http.get("/sagas/not-an-id") as answer:  # malformed: cannot exist
        assert answer.status == 404
    async with http.get("/static/secrets.py") as answer:
        assert answer.status == 404


async def test_names_outputs_and_errors_are_shown_as_text(
    http: aiohttp.ClientSession, client: SagaClient, web: Coordinator
) -> None:
    evil = "<script>alert(1)</script>"
    saga = await client.start_saga_request(request(f"x{evil}", note=evil))
    assert web.store is not None
    stored, _ = await web.store.get(saga.id)
    step = stored.steps[0]
    await web.store.apply(
        saga.id,
        engine.StepReplied(
            step_id=step.id,
            kind=CommandKind.EXECUTE,
            attempt=step.attempts,
            token=step.token or "",
            succeeded=True,
            output={"html": evil},
        ),
    )
    for path in (f"/sagas/{saga.id}", "/sagas"):
        async with http.get(path) as answer:
            page = await answer.text()
        assert "<script>alert" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    async with http.get("/sagas", params={"name": evil}) as answer:
        assert "<script>alert" not in await answer.text()


async def test_actions_need_the_pages_header_and_origin(
    http: aiohttp.ClientSession, client: SagaClient, web: Coordinator, delivered: None
) -> None:
    saga = await client.start_saga_request(request())
    path = f"/sagas/{saga.id}/compensate"
    async with http.post(path, data={"reason": "x"}) as answer:  # a cross-site form
        assert answer.status == 403
    headers = {**ACTION, "Origin": "https://evil.example"}
    async with http.post(path, json={"reason": "x"}, headers=headers) as answer:
        assert answer.status == 403
    async with http.post(path, data="{", headers=ACTION) as answer:
        assert answer.status == 400
    assert (await client.get_saga(saga.id)).state == "started"
    origin = {**ACTION, "Origin": f"http://127.0.0.1:{web.http_port}"}
    async with http.post(path, json={"reason": "by hand"}, headers=origin) as answer:
        assert answer.status == 200
        assert (await answer.json())["state"] == "compensating"
    resolve = f"/sagas/{saga.id}/resolve"
    body = {"resolution": "retry", "reason": "fixed"}
    async with http.post(resolve, json=body, headers=ACTION) as answer:
        assert answer.status == 409  # not in compensation_failed
        assert "error" in await answer.json()
    async with http.post(resolve, json={**body, "resolution": "x"}, headers=ACTION) as answer:
        assert answer.status == 400


async def test_the_event_stream_sends_each_transition_then_ends(
    http: aiohttp.ClientSession, client: SagaClient, web: Coordinator
) -> None:
    saga = await client.start_saga_request(request())
    assert web.store is not None
    async with http.get(f"/sagas/{saga.id}/events") as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        events = _events(answer.content)
        first = await _next(events)
        assert first[0] == "saga" and first[1]["state"] == "started"
        assert set(first[1]["sections"]) >= {"summary", "timeline", "steps", "history"}
        await succeed(web.store, saga.id, fail=True)  # nothing done: the saga fails
        seen = [first]
        while seen[-1][0] != "end":
            seen.append(await _next(events))
    assert seen[-2][1]["state"] == "failed"
    assert "step_failed" in seen[-2][1]["sections"]["history"]


def _count(page: str, state: str) -> str:
    found = re.search(rf"data-state={state}>.*?<b class=count>([^<]*)</b>", page)
    assert found is not None, page
    return found.group(1)


async def _events(stream: aiohttp.StreamReader) -> AsyncIterator[tuple[str, Any]]:
    name = ""
    async for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


async def _next(events: AsyncIterator[tuple[str, Any]]) -> tuple[str, Any]:
    async with asyncio.timeout(WAIT):
        return await anext(events)


async def test_sagaplane_serve_serves_the_page_and_stops_with_a_stream_open(
    database_url: str, amqp_url: str
) -> None:
    http_port = free_port()
    process = CoordinatorProcess(database_url, amqp_url)
    await process.start({"SAGAPLANE_HTTP_LISTEN": f"127.0.0.1:{http_port}"})
    try:
        async with SagaClient(process.address) as client:
            saga = await client.start_saga_request(request())
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as http,
            http.get(f"/sagas/{saga.id}/events") as answer,
        ):
            events = _events(answer.content)
            assert (await _next(events))[0] == "saga"
            status = await process.terminate()
            with pytest.raises((StopAsyncIteration, aiohttp.ClientError)):
                await _next(events)  # the stream ends with the process
        assert status == 0, process.tail()
    finally:
        await process.stop()


async def test_resolve_marks_a_stuck_compensation_compensated(
    http: aiohttp.ClientSession, client: SagaClient, web: Coordinator
) -> None:
    assert web.store is not None
    saga = await client.start_saga_request(request())
    await succeed(web.store, saga.id)  # create done, reserve in flight
    async with http.post(f"/sagas/{saga.id}/compensate", json={}, headers=ACTION) as answer:
        assert answer.status == 200
    await succeed(web.store, saga.id, fail=True)  # reserve fails: create is undone
    await fail_compensation(web.store, saga.id, "refund service gone")  # ...and fails
    async with http.get(f"/sagas/{saga.id}") as answer:
        page = await answer.text()
    assert "compensation_failed" in page and "Resolve compensation" in page
    assert "refund service gone" in page
    path = f"/sagas/{saga.id}/resolve"
    async with http.post(path, json={"resolution": "mark_compensated"}, headers=ACTION) as answer:
        assert answer.status == 400  # a reason is required
        assert "reason" in (await answer.json())["error"]
    body = {"resolution": "mark_compensated", "reason": "refunded by hand"}
    async with http.post(path, json=body, headers=ACTION) as answer:
        assert answer.status == 200
        assert (await answer.json())["state"] == "compensated"
    history = (await client.get_saga(saga.id, include_history=True)).history
    assert any(h.reason == "refunded by hand" for h in history)


class TokenGuard(grpc.aio.ServerInterceptor):
    """A stand-in for the API's access control: ``Bearer s3cret`` may do everything,
    ``Bearer reader`` may only read, any other caller is UNAUTHENTICATED."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        metadata = dict(details.invocation_metadata or ())
        token = metadata.get("authorization", "")
        method = details.method.rsplit("/", 1)[-1]
        if token == "Bearer s3cret" or (
            token == "Bearer reader" and method in ("GetSaga", "ListSagas", "WatchSaga")
        ):
            return await continuation(details)
        code = grpc.StatusCode.PERMISSION_DENIED if token else grpc.StatusCode.UNAUTHENTICATED

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(code, f"{method}: not for {token or 'anonymous callers'}")

        return grpc.unary_unary_rpc_method_handler(refuse)


async def test_the_page_acts_with_its_callers_credentials(web: Coordinator) -> None:
    """Every call the page makes carries the browser's token (HTTP Basic password, or
    a Bearer header): the API's access control decides, never the page."""
    assert web.store is not None and web.listener is not None
    server = grpc.aio.server(interceptors=[TokenGuard(), ErrorMappingInterceptor()])
    tokens = PageTokens(await web.store.secret("page_tokens"))
    servicer = SagaCoordinatorServicer(web.store, tokens, web.listener)
    coordinator_pb2_grpc.add_SagaCoordinatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The page's own client has a token of its own; it must never be used for a caller.
    pages = WebServer(SagaClient(f"127.0.0.1:{port}", token="s3cret"), "127.0.0.1:0")
    await pages.start()
    try:
        async with SagaClient(f"127.0.0.1:{port}", token="s3cret") as client:
            saga = await client.start_saga_request(request())
        async with aiohttp.ClientSession(f"http://127.0.0.1:{pages.port}") as http:
            async with http.get("/sagas") as answer:
                assert answer.status == 401
                assert answer.headers["WWW-Authenticate"].startswith("Basic")
            # What a browser sends once the user typed a name and the token as password.
            reader = {"Authorization": "Basic " + base64.b64encode(b"ann:reader").decode()}
            async with http.get(f"/sagas/{saga.id}", headers=reader) as answer:
                assert answer.status == 200
            async with http.get("/sagas", headers=reader) as answer:
                assert answer.status == 200
                assert saga.id in await answer.text()
            compensate = f"/sagas/{saga.id}/compensate"
            async with http.post(compensate, json={}, headers=ACTION | reader) as answer:
                assert answer.status == 403
            operator = {**ACTION, "Authorization": "Bearer s3cret"}
            async with http.post(compensate, json={}, headers=operator) as answer:
                assert answer.status == 200
    finally:
        await pages.stop()
        await server.stop(0)


async def test_a_step_whose_command_reached_no_queue_says_so(
    http: aiohttp.ClientSession, client: SagaClient
) -> None:
    """No participant consumes shop.create: the step's page says why the saga waits."""
    saga = await client.start_saga_request(request())
    for _ in range(int(WAIT / 0.05)):  # until the relay's publish came back unroutable
        if (await client.get_saga(saga.id)).steps[0].delivery_problem:
            break
        await asyncio.sleep(0.05)
    async with http.get(f"/sagas/{saga.id}") as answer:
        assert answer.status == 200
        page = await answer.text()
    assert "command not delivered: no queue is bound to" in page
    assert "shop.create" in page
