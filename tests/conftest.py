"""Fixtures that build real things cheaply: databases from a migrated template,
coordinators on port 0. Connection settings come from libpq's PG* variables."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import psycopg
import pytest

from coordinator.app import Coordinator
from coordinator.config import Settings
from coordinator.store.migrate import migrate
from sagaplane.v1 import coordinator_pb2_grpc


def server_url(dbname: str) -> str:
    """A libpq URL for ``dbname`` on the test server (PGHOST/PGPORT/PGUSER or defaults)."""
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def unique_name(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def create_database(name: str, template: str | None = None) -> None:
    """CREATE DATABASE, optionally as a copy of ``template``."""
    async with await psycopg.AsyncConnection.connect(server_url("postgres"), autocommit=True) as c:
        query = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        await c.execute(query.encode())


async def drop_database(name: str) -> None:
    """DROP DATABASE, disconnecting whoever is still connected."""
    async with await psycopg.AsyncConnection.connect(server_url("postgres"), autocommit=True) as c:
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


async def rabbitmqctl(*args: str) -> None:
    """Run rabbitmqctl (the tests run on the broker's machine, as its administrator)."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {(out + err).decode()}")


@asynccontextmanager
async def fresh_vhost() -> AsyncIterator[str]:
    """A new RabbitMQ vhost for guest, deleted afterwards; yields its AMQP URL."""
    vhost = unique_name("sagaplane_test")
    await rabbitmqctl("add_vhost", vhost)
    try:
        await rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        host = os.environ.get("SAGAPLANE_TEST_AMQP_HOST", "127.0.0.1:5672")
        yield f"amqp://guest:guest@{host}/{vhost}"
    finally:
        await rabbitmqctl("delete_vhost", vhost)


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
    settings = Settings(
        database_url=database_url, amqp_url=amqp_url, listen="127.0.0.1:0", pool_size=4, grace=1.0
    )
    async with Coordinator(settings) as running:
        yield running


@pytest.fixture
async def stub(
    coordinator: Coordinator,
) -> AsyncIterator[coordinator_pb2_grpc.SagaCoordinatorServiceStub]:
    """A gRPC stub connected to the running coordinator over a real channel."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
        yield coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)
