"""Stopping and restoring the machine's PostgreSQL and RabbitMQ (the restart faults).

Both are shared with everything else running on the machine: whoever stops one must
start it again and wait until it answers. :func:`ensure_all_running_sync` is the last
line of defence, run at the end of the session if a restart fault ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time

import aio_pika
import psycopg

from helpers.database import server_url
from sagaplane.testing import RabbitmqctlFailed, rabbitmqctl

log = logging.getLogger("fault.services")

TOUCHED: set[str] = set()
"""The services a fault stopped during this session."""


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


def _pg_ctl(action: str) -> list[str]:
    return ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", action]


async def _run(*argv: str, check: bool = True) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}: {out.decode()}")
    assert proc.returncode is not None
    return proc.returncode


async def stop_rabbitmq_app() -> None:
    TOUCHED.add("rabbitmq")
    log.warning("stopping the RabbitMQ application")
    await rabbitmqctl("stop_app")


async def ensure_rabbitmq_running(amqp_url: str, timeout: float = 120.0) -> None:
    """start_app (a no-op when running), then wait until ``amqp_url`` accepts a connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await rabbitmqctl("start_app")
            break
        except RabbitmqctlFailed:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(1)
    with contextlib.suppress(RabbitmqctlFailed):
        await rabbitmqctl("await_startup")
    while True:
        try:
            connection = await aio_pika.connect(amqp_url, timeout=5)
            await connection.close()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ not back after {timeout}s: {exc}") from exc
            await asyncio.sleep(0.5)


async def restart_postgres() -> None:
    TOUCHED.add("postgres")
    log.warning("restarting PostgreSQL")
    await _run(*_pg_ctl("restart"))


async def ensure_postgres_running(timeout: float = 120.0) -> None:
    """Start the cluster if it is down, then wait until it accepts connections."""
    deadline = time.monotonic() + timeout
    if await _run(*_pg_ctl("status"), check=False) != 0:
        await _run(*_pg_ctl("start"), check=False)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                server_url("postgres"), connect_timeout=5
            ) as conn:
                await conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not back after {timeout}s: {exc}") from exc
            await asyncio.sleep(0.5)


def ensure_all_running_sync() -> list[str]:
    """Start whatever a fault stopped and is still down; what had to be started."""
    started = []
    if "postgres" in TOUCHED and subprocess.run(_pg_ctl("status"), check=False).returncode:
        subprocess.run(_pg_ctl("start"), check=False)
        started.append("postgres")
    if "rabbitmq" in TOUCHED:
        # A no-op on a running node.
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=False)
        started.append("rabbitmq (start_app)")
    return started
