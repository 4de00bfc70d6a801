"""Passwords stay secret: not in ``--help``, not in error messages, not in the logs of a
coordinator that ran, served calls, failed to connect and shut down."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

from helpers.broker import rabbitmqctl
from helpers.processes import free_port
from sagaplane import InvalidArgument, SagaClient, StepSpec
from sagaplane.testing import Child

SAGAPLANE = str(Path(sys.executable).parent / "sagaplane")
PG_SECRET = f"pg-Secret-{uuid.uuid4().hex[:8]}"
AMQP_SECRET = f"mq-Secret-{uuid.uuid4().hex[:8]}"


def _with_password(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@', 1)[-1]}"


async def _run(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _env(**settings: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    return clean | settings


@pytest.mark.parametrize(
    "command",
    [
        [SAGAPLANE, "serve", "--help"],
        [SAGAPLANE, "migrate", "--help"],
        [sys.executable, "-m", "examples.shop", "demo", "--help"],
        [sys.executable, "-m", "coordinator", "--help"],
    ],
)
async def test_help_shows_urls_with_the_password_masked(command: list[str]) -> None:
    env = _env(
        SAGAPLANE_DATABASE_URL=f"postgresql://app:{PG_SECRET}@db.example:5432/sagas",
        SAGAPLANE_DEMO_DATABASE_URL=f"postgresql://app:{PG_SECRET}@db.example:5432/demo",
        SAGAPLANE_AMQP_URL=f"amqp://app:{AMQP_SECRET}@mq.example:5672/",
    )
    status, out = await _run(*command, env=env)
    assert status == 0, out
    assert PG_SECRET not in out and AMQP_SECRET not in out
    assert "app:***@" in out


@pytest.mark.parametrize(
    "observability",
    [
        {},
        # JSON lines, and every span printed too (the console exporter writes to stdout).
        {"SAGAPLANE_LOG_FORMAT": "json", "OTEL_TRACES_EXPORTER": "console"},
    ],
    ids=["text", "json-and-spans"],
)
async def test_a_coordinators_logs_hold_no_password(
    database_url: str, amqp_url: str, observability: dict[str, str]
) -> None:
    user = f"secret-test-{uuid.uuid4().hex[:8]}"
    vhost = amqp_url.rsplit("/", 1)[1]
    await rabbitmqctl("add_user", user, AMQP_SECRET)
    try:
        await rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        # PostgreSQL trusts local connections here: the password is carried, never needed.
        db = _with_password(database_url, "postgres", PG_SECRET)
        mq = _with_password(amqp_url, user, AMQP_SECRET)
        port = free_port()
        env = _env(
            SAGAPLANE_DATABASE_URL=db,
            SAGAPLANE_AMQP_URL=mq,
            SAGAPLANE_LISTEN=f"127.0.0.1:{port}",
            SAGAPLANE_GRACE="1",
            SAGAPLANE_LOG_LEVEL="DEBUG",
            **observability,
        )
        output: list[str] = []

        status, out = await _run(SAGAPLANE, "migrate", env=env)
        assert status == 0, out
        output.append(out)

        # Every line it writes is kept, to be searched for the password.
        serve = Child("serve", [SAGAPLANE, "serve"], env=env, tail_lines=1_000_000)
        await serve.start()
        try:
            async with SagaClient(f"127.0.0.1:{port}") as client:
                saga = None
                for _ in range(300):
                    try:
                        saga = await client.start_saga(
                            "order", [StepSpec("create", "orders.create")]
                        )
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                assert saga is not None, "the coordinator did not come up"
                await client.get_saga(saga.id, include_history=True)
                await client.list_active()
                with pytest.raises(InvalidArgument):
                    await client.start_saga("", [])
                await asyncio.sleep(1)  # the relay's publish and its logs
        finally:
            await serve.stop()
            output.append(serve.tail(1_000_000))

        # And a start that fails: the error names where it connects, without the password.
        wrong = _with_password(amqp_url, user, AMQP_SECRET + "-wrong")
        status, out = await _run(SAGAPLANE, "serve", env=env | {"SAGAPLANE_AMQP_URL": wrong})
        assert status != 0
        assert f"{user}:***@" in out, out
        output.append(out)
    finally:
        await rabbitmqctl("delete_user", user)

    logs = "\n".join(output)
    assert "coordinator listening" in logs and "DEBUG" in logs
    assert PG_SECRET not in logs, [line for line in logs.splitlines() if PG_SECRET in line][:5]
    assert AMQP_SECRET not in logs, [line for line in logs.splitlines() if AMQP_SECRET in line][:5]
