"""WatchSaga against a real coordinator, PostgreSQL and a real gRPC channel.

Transitions are committed through the store (``SagaStore.apply``, what the reply
consumer does with a participant's reply): the stream must announce each one, whichever
coordinator committed it, once, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from coordinator.app import Coordinator
from coordinator.store.notifications import TASK_NAME
from coordinator.store.repository import SagaStore
from helpers.broker import commands_sink
from helpers.coordinators import coordinator_settings
from helpers.processes import CoordinatorProcess
from helpers.transitions import STEPS, request, succeed, undo_all
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub
WAIT = 15.0


async def events(stub: Stub, saga_id: str) -> list[tuple[int, str, str]]:
    """The saga's whole history as GetSaga answers it: (position, event, step)."""
    saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
    return [(h.position, h.event, h.step_name) for h in saga.history]


def store_of(coordinator: Coordinator) -> SagaStore:
    assert coordinator.store is not None
    return coordinator.store


def count_reads(store: SagaStore, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the store's WatchSaga reads (SagaStore.changes) from now on."""
    reads = 0
    changes = store.changes

    async def counted(saga_id: str, *, after: int) -> object:
        nonlocal reads
        reads += 1
        return await changes(saga_id, after=after)

    monkeypatch.setattr(store, "changes", counted)
    return lambda: reads


@pytest.fixture
async def second(coordinator: Coordinator) -> AsyncIterator[Coordinator]:
    """Another coordinator on the same database (a replica)."""
    settings = dataclasses.replace(coordinator.settings, listen="127.0.0.1:0")
    async with Coordinator(settings) as running:
        yield running


async def next_message(
    stream: grpc.aio.UnaryStreamCall[api.WatchSagaRequest, api.WatchSagaResponse],
) -> api.WatchSagaResponse:
    async with asyncio.timeout(WAIT):
        message = await stream.read()
    assert message is not grpc.aio.EOF, "the stream ended early"
    assert isinstance(message, api.WatchSagaResponse)
    return message


async def rest(
    stream: grpc.aio.UnaryStreamCall[api.WatchSagaRequest, api.WatchSagaResponse],
) -> list[api.WatchSagaResponse]:
    """Every message until the stream ends (OK), read with read() as next_message does."""
    messages = []
    async with asyncio.timeout(WAIT):
        while (message := await stream.read()) is not grpc.aio.EOF:
            assert isinstance(message, api.WatchSagaResponse)
            messages.append(message)
    assert await stream.code() == grpc.StatusCode.OK
    return messages


async def test_a_watcher_joining_mid_saga_gets_every_later_transition_once_in_order_then_the_end(
    stub: Stub, coordinator: Coordinator
) -> None:
    store = store_of(coordinator)
    saga_id = (await stub.StartSaga(request())).saga.id
    await succeed(store, saga_id)  # create done, reserve dispatched: we join here
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    first = await next_message(stream)
    assert first.saga.state == model.SAGA_STATE_STARTED
    assert [h.event for h in first.history] == [
        "saga_started",
        "step_dispatched",
        "step_completed",
        "step_dispatched",
    ]
    # reserve completes, then charge fails: the saga compensates create and reserve.
    received = list(first.history)
    await succeed(store, saga_id)
    await succeed(store, saga_id, fail=True)
    await undo_all(store, saga_id)
    later = await rest(stream)
    assert all(m.history for m in later), "a later message always carries transitions"
    received += [h for m in later for h in m.history]
    last = later[-1]
    assert last.saga.state == model.SAGA_STATE_COMPENSATED
    # Every transition exactly once, in order: the history as GetSaga tells it.
    assert [(h.position, h.event, h.step_name) for h in received] == await events(stub, saga_id)
    assert received[-1].event == "saga_compensated"
    # The saga in each message is as its last entry left it.
    assert last.saga.state == received[-1].to_state


async def test_reconnecting_with_the_last_position_loses_and_repeats_nothing(
    stub: Stub, coordinator: Coordinator
) -> None:
    store = store_of(coordinator)
    saga_id = (await stub.StartSaga(request())).saga.id
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    received = list((await next_message(stream)).history)
    await succeed(store, saga_id)
    while received[-1].event != "step_dispatched" or received[-1].step_name != "reserve":
        received += (await next_message(stream)).history
    stream.cancel()  # the connection is lost...
    await succeed(store, saga_id)  # ...while reserve completes and charge is dispatched
    resumed = stub.WatchSaga(api.WatchSagaRequest(id=saga_id, after_position=received[-1].position))
    first = await next_message(resumed)
    assert [(h.event, h.step_name) for h in first.history] == [
        ("step_completed", "reserve"),
        ("step_dispatched", "charge"),
    ]
    received += first.history
    await succeed(store, saga_id)
    received += [h for m in await rest(resumed) for h in m.history]
    assert [(h.position, h.event, h.step_name) for h in received] == await events(stub, saga_id)
    assert received[-1].event == "saga_completed"


async def test_a_transition_applied_by_another_coordinator_is_streamed(
    stub: Stub, coordinator: Coordinator, second: Coordinator
) -> None:
    saga_id = (await stub.StartSaga(request())).saga.id
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    before = await next_message(stream)
    await succeed(store_of(second), saga_id)  # the other replica applies the reply
    after = await next_message(stream)
    assert [(h.event, h.step_name) for h in after.history] == [
        ("step_completed", "create"),
        ("step_dispatched", "reserve"),
    ]
    assert after.history[0].position > before.history[-1].position
    assert after.saga.steps[0].status == model.STEP_STATUS_COMPLETED
    stream.cancel()


async def test_a_lost_notification_connection_loses_no_transition(
    stub: Stub, coordinator: Coordinator
) -> None:
    listener = coordinator.listener
    assert listener is not None
    saga_id = (await stub.StartSaga(request())).saga.id
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    received = list((await next_message(stream)).history)
    # The listening connection dies, and a transition commits before it is back.
    async with await psycopg.AsyncConnection.connect(
        coordinator.settings.database_url, autocommit=True
    ) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (TASK_NAME,),
        )
        async with asyncio.timeout(WAIT):
            # No event says "lost"; the gap lasts a backoff delay (50 ms or more).
            while listener.connected.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    await succeed(store_of(coordinator), saga_id)
    async with asyncio.timeout(WAIT):
        while received[-1].step_name != "reserve":
            received += (await next_message(stream)).history
    assert [(h.position, h.event, h.step_name) for h in received] == await events(stub, saga_id)
    stream.cancel()


async def test_a_finished_saga_gets_one_message_and_the_end(
    stub: Stub, coordinator: Coordinator
) -> None:
    store = store_of(coordinator)
    saga_id = (await stub.StartSaga(request())).saga.id
    for _ in STEPS:
        await succeed(store, saga_id)
    messages = [m async for m in stub.WatchSaga(api.WatchSagaRequest(id=saga_id))]
    assert len(messages) == 1
    assert messages[0].saga.state == model.SAGA_STATE_COMPLETED
    assert messages[0].history[-1].event == "saga_completed"
    # Resumed after its end: the saga, nothing new, the end.
    last = messages[0].history[-1].position
    again = [m async for m in stub.WatchSaga(api.WatchSagaRequest(id=saga_id, after_position=last))]
    assert [len(m.history) for m in again] == [0]


@pytest.mark.parametrize(
    ("watch", "code", "detail"),
    [
        (api.WatchSagaRequest(id="01ARZ3NDEKTSV4RRFFQ69G5FAV"), grpc.StatusCode.NOT_FOUND, ""),
        (api.WatchSagaRequest(id="not-an-id"), grpc.StatusCode.NOT_FOUND, ""),
        (api.WatchSagaRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT, "id: is required"),
    ],
)
async def test_unknown_and_bad_ids_are_refused_as_get_saga_refuses_them(
    stub: Stub, watch: api.WatchSagaRequest, code: grpc.StatusCode, detail: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchSaga(watch):
            pass
    assert caught.value.code() == code
    assert detail in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as got:
        await stub.GetSaga(api.GetSagaRequest(id=watch.id))
    assert got.value.code() == code


async def test_a_negative_after_position_is_invalid_argument_naming_it(stub: Stub) -> None:
    saga_id = (await stub.StartSaga(request())).saga.id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchSaga(api.WatchSagaRequest(id=saga_id, after_position=-1)):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "after_position" in (caught.value.details() or "")


@pytest.fixture
async def impatient(database_url: str, amqp_url: str) -> AsyncIterator[Coordinator]:
    """A coordinator that cuts a watcher off after one second unread."""
    settings = coordinator_settings(database_url, amqp_url, watch_send_timeout=1.0)
    async with Coordinator(settings) as running:
        yield running


async def test_a_watcher_that_never_reads_is_cut_off_and_the_server_keeps_serving(
    impatient: Coordinator,
) -> None:
    store = store_of(impatient)
    # Big messages (each carries the saga and its 60 KiB context) fill HTTP/2's flow
    # control window after a few transitions. The client's window is kept small (no
    # BDP probing), as a slow mobile client's would be.
    big = "x" * 60_000
    options = [("grpc.http2.bdp_probe", 0)]
    target = f"127.0.0.1:{impatient.port}"
    async with (
        grpc.aio.insecure_channel(target, options=options) as slow_channel,
        grpc.aio.insecure_channel(target) as channel,
    ):
        slow, stub = Stub(slow_channel), Stub(channel)
        saga_id = (await stub.StartSaga(request(blob=big))).saga.id
        stream = slow.WatchSaga(api.WatchSagaRequest(id=saga_id))
        await stream.wait_for_connection()
        # Transitions keep coming, and nobody reads for longer than the coordinator waits.
        for _ in range(2):
            await succeed(store, saga_id)
        await asyncio.sleep(2.5)
        await succeed(store, saga_id)  # the saga completes: not sent to the slow watcher
        # When it reads at last, it finds what was sent before it was cut off, then the
        # status: nothing more was queued for it.
        received: list[api.WatchSagaResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(WAIT):
                while (message := await stream.read()) is not grpc.aio.EOF:
                    assert isinstance(message, api.WatchSagaResponse)
                    received.append(message)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details() or ""
        assert "did not read" in details and "after_position" in details
        assert received and received[-1].saga.state == model.SAGA_STATE_STARTED
        # The coordinator still serves, watchers included, and forgot the slow one.
        messages = [m async for m in stub.WatchSaga(api.WatchSagaRequest(id=saga_id))]
        assert messages[-1].saga.state == model.SAGA_STATE_COMPLETED
        assert impatient.listener is not None and impatient.listener.watching == 0


async def test_transitions_its_own_coordinator_commits_are_not_read_back(
    stub: Stub, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch, delivered: None
) -> None:
    """The coordinator that commits a transition hands it to its watchers with the
    entries it wrote: one read for the saga as it was, none after; what the stream says
    is what the database holds. (Its commands are delivered: a command the broker
    returned would show in GetSaga as a delivery problem, which no transition streams.)"""
    store = store_of(coordinator)
    reads = count_reads(store, monkeypatch)
    saga_id = (await stub.StartSaga(request())).saga.id
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    received = list((await next_message(stream)).history)
    for _ in STEPS:
        await succeed(store, saga_id)
    later = await rest(stream)
    received += [h for m in later for h in m.history]
    assert later[-1].saga.state == model.SAGA_STATE_COMPLETED
    assert reads() == 1
    assert [(h.position, h.event, h.step_name) for h in received] == await events(stub, saga_id)
    assert [h.at for h in received] == [
        h.at
        for h in (
            await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))
        ).saga.history
    ]
    stored = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga
    assert later[-1].saga == stored


async def test_a_saga_just_started_here_is_watched_without_reading_it_back(
    stub: Stub, coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch, delivered: None
) -> None:
    """While WatchSaga is in use, a saga this coordinator starts is remembered for its
    first watchers (store/recent.py): a stream opened right after StartSaga reads
    nothing, and says exactly what the database holds. (Its commands are delivered: a
    command the broker returned would show in GetSaga as a delivery problem, which the
    remembered start cannot know of.)"""
    store = store_of(coordinator)
    # WatchSaga in use: starts are remembered from now on.
    warm = stub.WatchSaga(api.WatchSagaRequest(id=(await stub.StartSaga(request())).saga.id))
    await next_message(warm)
    warm.cancel()
    reads = count_reads(store, monkeypatch)
    saga_id = (await stub.StartSaga(request())).saga.id
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    first = await next_message(stream)
    assert reads() == 0
    stored = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
    assert [(h.position, h.event, h.at) for h in first.history] == [
        (h.position, h.event, h.at) for h in stored.history
    ]
    del stored.history[:]
    assert first.saga == stored
    for _ in STEPS:
        await succeed(store, saga_id)
    later = await rest(stream)
    assert reads() == 0
    received = [h for m in [first, *later] for h in m.history]
    assert [(h.position, h.event, h.step_name) for h in received] == await events(stub, saga_id)
    # From a position: only what comes after it.
    again = stub.WatchSaga(api.WatchSagaRequest(id=saga_id, after_position=received[-2].position))
    assert [h.position for h in (await next_message(again)).history] == [received[-1].position]


async def test_a_remembered_start_that_a_replica_moved_on_is_read_again(
    stub: Stub, coordinator: Coordinator, second: Coordinator
) -> None:
    """A replica's commit after the start (notified to this coordinator's listener)
    makes the start's memory stale: the first message is read from the database."""
    warm = stub.WatchSaga(api.WatchSagaRequest(id=(await stub.StartSaga(request())).saga.id))
    await next_message(warm)
    warm.cancel()
    saga_id = (await stub.StartSaga(request())).saga.id
    listener = coordinator.listener
    assert listener is not None and listener.recent.recall(saga_id) is not None
    await succeed(store_of(second), saga_id)
    async with asyncio.timeout(WAIT):
        while listener.recent.recall(saga_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # until the notification is in
    stream = stub.WatchSaga(api.WatchSagaRequest(id=saga_id))
    first = await next_message(stream)
    assert [(h.position, h.event, h.step_name) for h in first.history] == await events(
        stub, saga_id
    )
    stream.cancel()


def rss_mib(pid: int) -> float:
    """A process's resident set size, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_watchers_that_never_read_leave_the_coordinators_memory_flat(
    stub: Stub, coordinator: Coordinator, database_url: str, amqp_url: str
) -> None:
    """20 watchers that never read, on sagas whose every message carries 60 KiB, while
    each saga goes through 30 transitions: the coordinator that serves them (a process
    of its own; the transitions are committed by a replica) keeps nothing of what it
    could not send: its memory does not grow with it. (That such a watcher is cut off
    is test_a_watcher_that_never_reads_is_cut_off_and_the_server_keeps_serving.)"""
    # The commands go to a queue that keeps none of them: delivered, so no relay keeps
    # retrying 60 KiB messages while the memory is read.
    async with commands_sink(amqp_url):
        await _watch_without_reading(stub, store_of(coordinator), database_url, amqp_url)


async def _watch_without_reading(
    stub: Stub, store: SagaStore, database_url: str, amqp_url: str
) -> None:
    served = CoordinatorProcess(database_url, amqp_url)
    await served.start({"SAGAPLANE_WATCH_SEND_TIMEOUT": "1"})
    big = "x" * 60_000
    steps, warm = 60, 20
    # Every step after the first runs beside the others: all commands go out during the
    # first round, so the rounds measured hold only replies (no 60 KiB command to relay).
    start = api.StartSagaRequest(
        name="order.big",
        steps=[api.StepSpec(name="s0", action="shop.s0")]
        + [
            api.StepSpec(name=f"s{i}", action=f"shop.s{i}", depends_on=["s0"])
            for i in range(1, steps)
        ],
    )
    start.context.fields["blob"].string_value = big
    start.step_timeout.FromSeconds(3600)  # no attempt times out however slow this runs
    options = [("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(served.address, options=options) for _ in range(20)]
    try:
        ids = [(await stub.StartSaga(start)).saga.id for _ in channels]
        streams = [
            Stub(channel).WatchSaga(api.WatchSagaRequest(id=saga_id))
            for channel, saga_id in zip(channels, ids, strict=True)
        ]
        for stream in streams:
            await stream.wait_for_connection()
        # A third of the transitions first: the watchers block and are cut off, the
        # commands are relayed, and the allocator reaches its working size. Then the
        # rest, which nobody can send.
        for _ in range(warm):
            for saga_id in ids:
                await succeed(store, saga_id)
        await asyncio.sleep(2)
        before = rss_mib(served.pid)
        for _ in range(steps - warm):
            for saga_id in ids:
                await succeed(store, saga_id)
        await asyncio.sleep(2)
        grown = rss_mib(served.pid) - before
        unsent = len(ids) * (steps - warm) * len(big) / 2**20
        print(f"coordinator RSS {before:.1f} MiB, then {grown:+.1f} MiB; {unsent:.0f} MiB unsent")
        assert grown < unsent / 10, f"RSS grew {grown:.1f} MiB while {unsent:.0f} MiB went unsent"
        # It still serves a watcher that reads.
        async with grpc.aio.insecure_channel(served.address) as reading:
            messages = [m async for m in Stub(reading).WatchSaga(api.WatchSagaRequest(id=ids[0]))]
        assert messages[-1].saga.state == model.SAGA_STATE_COMPLETED
    finally:
        for slow_channel in channels:
            await slow_channel.close()
        await served.stop()
