"""The coordinator SIGKILLed in the middle of a batch of sagas, then restarted."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from helpers.processes import CoordinatorProcess, free_port
from helpers.shop import Shop, order_request, shop, shop_databases, wait_terminal
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

__all__ = ["shop", "shop_databases"]


@pytest.fixture
async def coordinator_process(
    database_url: str, amqp_url: str
) -> AsyncIterator[CoordinatorProcess]:
    process = CoordinatorProcess(database_url=database_url, amqp_url=amqp_url, port=free_port())
    await process.start()
    yield process
    await process.terminate()


async def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(
    coordinator_process: CoordinatorProcess, shop: Shop
) -> None:
    async with grpc.aio.insecure_channel(coordinator_process.address) as channel:
        stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)
        # Every fifth order is over the payment limit, so compensations cross the crash too.
        amounts = [5000 if i % 5 == 0 else 10 + i for i in range(50)]
        ids = []
        for i, amount in enumerate(amounts):
            ids.append((await stub.StartSaga(order_request(amount=amount))).saga.id)
            if i == 25:
                await asyncio.sleep(random.uniform(0.0, 0.2))
                await coordinator_process.kill()
                await coordinator_process.start()

        sagas = await wait_terminal(stub, ids, timeout=120)

    states = Counter(sagas[saga_id].state for saga_id in ids)
    assert states == {model.SAGA_STATE_COMPLETED: 40, model.SAGA_STATE_COMPENSATED: 10}
    effects = Counter((saga_id, action) for saga_id, action, _ in await shop.effects())
    assert max(effects.values()) == 1, "an effect happened twice"
    assert len(effects) == 40 * 3 + 10 * 4
    assert len(await shop.rows("orders", "SELECT 1 FROM shop_orders")) == 50


async def test_sigterm_drains_and_exits_cleanly(database_url: str, amqp_url: str) -> None:
    process = CoordinatorProcess(database_url=database_url, amqp_url=amqp_url, port=free_port())
    await process.start()
    async with grpc.aio.insecure_channel(process.address) as channel:
        stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)
        started = (await stub.StartSaga(order_request())).saga
        async with asyncio.timeout(20):
            status = await process.terminate()
    assert status == 0
    # What was committed before the shutdown is there after a restart.
    await process.start()
    async with grpc.aio.insecure_channel(process.address) as channel:
        stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)
        again = (await stub.GetSaga(api.GetSagaRequest(id=started.id))).saga
        assert again.id == started.id and again.state == model.SAGA_STATE_STARTED
    assert await process.terminate() == 0
