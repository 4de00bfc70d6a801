"""SagaClient.watch / wait and ``sagaplane watch`` follow the WatchSaga stream: they
issue no GetSaga at all, counted by a server interceptor.

The server here is a second gRPC server of the test's own over the running coordinator's
store and listener (the coordinator's own server has no place for a test interceptor).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from coordinator.api.interceptors import ErrorMappingInterceptor
from coordinator.api.page_tokens import PageTokens
from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.app import Coordinator
from helpers.cli import exit_status
from helpers.transitions import STEPS, request, succeed
from sagaplane import SagaClient
from sagaplane.v1 import coordinator_pb2_grpc

WAIT = 15.0


class Counting(grpc.aio.ServerInterceptor):
    """Counts the calls by method name (``GetSaga``, ``WatchSaga``, ...)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        self.calls[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return await continuation(handler_call_details)


@pytest.fixture
async def counted(coordinator: Coordinator) -> AsyncIterator[tuple[str, Counting]]:
    """The coordinator's API on another port, every call counted."""
    assert coordinator.store is not None and coordinator.listener is not None
    counting = Counting()
    server = grpc.aio.server(interceptors=[counting, ErrorMappingInterceptor()])
    tokens = PageTokens(await coordinator.store.secret("page_tokens"))
    servicer = SagaCoordinatorServicer(coordinator.store, tokens, coordinator.listener)
    coordinator_pb2_grpc.add_SagaCoordinatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", counting
    await server.stop(0)


async def until_watched(coordinator: Coordinator, watchers: int = 1) -> None:
    assert coordinator.listener is not None
    async with asyncio.timeout(WAIT):
        while coordinator.listener.watching < watchers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_cli_watch_follows_the_stream_and_issues_no_get_saga(
    coordinator: Coordinator, counted: tuple[str, Counting], capsys: pytest.CaptureFixture[str]
) -> None:
    target, counting = counted
    assert coordinator.store is not None
    async with SagaClient(target) as client:
        saga_id = (await client.start_saga_request(request())).id
    # The real command, in a thread with its own event loop, as a shell would run it.
    watching = asyncio.create_task(
        asyncio.to_thread(exit_status, ["watch", saga_id, "--coordinator", target])
    )
    await until_watched(coordinator)
    for _ in STEPS:
        await succeed(coordinator.store, saga_id)
    async with asyncio.timeout(WAIT):
        status = await watching
    out = capsys.readouterr().out
    assert status == 0, out
    events = [line.split()[1] for line in out.splitlines() if line.startswith("    +")]
    assert events.count("step_completed") == 3
    assert events[-1] == "saga_completed"
    assert counting.calls["WatchSaga"] == 1
    assert counting.calls["GetSaga"] == 0


async def test_client_wait_and_watch_use_the_stream(
    coordinator: Coordinator, counted: tuple[str, Counting]
) -> None:
    target, counting = counted
    assert coordinator.store is not None
    async with SagaClient(target) as client:
        saga_id = (await client.start_saga_request(request())).id
        waiting = asyncio.create_task(client.wait(saga_id, timeout=WAIT))
        await until_watched(coordinator)
        await succeed(coordinator.store, saga_id)
        # Another watcher joins mid-saga, after the second step's dispatch.
        seen = [s async for s in _take(client.watch(saga_id), 1)]
        position = seen[0].history[-1].position
        resumed = asyncio.create_task(_all(client.watch(saga_id, after_position=position)))
        await until_watched(coordinator, 2)
        for _ in STEPS[1:]:
            await succeed(coordinator.store, saga_id)
        saga = await waiting
        assert saga.state.value == "completed"
        later = await resumed
    # Resumed after `position`: exactly the entries after it, in order, then the end.
    entries = later[-1].history
    assert [e.position for e in entries] == sorted({e.position for e in entries})
    assert all(e.position > position for e in entries)
    assert entries[-1].event == "saga_completed"
    assert len(seen[0].history) + len(entries) == len((await _history(target, saga_id)).history)
    assert counting.calls["GetSaga"] == 1  # _history's own, below
    assert counting.calls["WatchSaga"] == 3


async def _history(target: str, saga_id: str) -> Any:
    async with SagaClient(target) as client:
        return await client.get_saga(saga_id, include_history=True)


async def _take(stream: AsyncIterator[Any], n: int) -> AsyncIterator[Any]:
    async for item in stream:
        yield item
        n -= 1
        if n == 0:
            return


async def _all(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]
