"""Fixtures that build real things cheaply: databases from a migrated template,
coordinators on port 0. The helpers they use are in ``tests/helpers``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from coordinator.app import Coordinator
from coordinator.store.migrate import migrate
from helpers.broker import commands_sink, fresh_vhost
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane.v1 import coordinator_pb2_grpc


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost for one test: no queue or message leaks between tests."""
    async with fresh_vhost() as url:
        yield url


@pytest.fixture(scope="session")
async def coordinator_template() -> AsyncIterator[str]:
    """A database with the coordinator's schema, copied by every test that needs one."""
    name = unique_name("sagaplane_tpl")
    await create_database(name)
    await migrate(server_url(name))
    yield name
    await drop_database(name)


@pytest.fixture
async def database_url(coordinator_template: str) -> AsyncIterator[str]:
    """A fresh, migrated coordinator database for one test."""
    name = unique_name("sagaplane_test")
    await create_database(name, template=coordinator_template)
    yield server_url(name)
    await drop_database(name)


@pytest.fixture
async def coordinator(database_url: str, amqp_url: str) -> AsyncIterator[Coordinator]:
    """A running coordinator on a free port, against a fresh database and vhost."""
    settings = coordinator_settings(database_url, amqp_url)
    async with Coordinator(settings) as running:
        yield running


@pytest.fixture
async def stub(
    coordinator: Coordinator,
) -> AsyncIterator[coordinator_pb2_grpc.SagaCoordinatorServiceStub]:
    """A gRPC stub connected to the running coordinator over a real channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        yield coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)


@pytest.fixture
async def delivered(amqp_url: str) -> AsyncIterator[None]:
    """Every command of the test's vhost is delivered, to a queue that never answers (as
    to a participant that is busy): the coordinator then awaits replies, where a command
    that reached no queue would be proven undelivered and its step not run."""
    async with commands_sink(amqp_url, "#"):
        yield
