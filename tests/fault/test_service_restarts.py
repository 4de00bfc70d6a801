"""RabbitMQ and PostgreSQL restarted under load (issue 5).

These restart the machine's shared brokers, so they disturb whatever else runs against
them: they are in a module of their own, which ``fault/conftest.py`` moves to the very
end of any session (deselect them with ``-k "not restart"``). The service is always
started again in a ``finally``, and the test waits until it answers before it ends;
``fault/conftest.py`` checks once more at the end of the session.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fault.harness import Rig
from fault.services import (
    ensure_postgres_running,
    ensure_rabbitmq_running,
    restart_postgres,
    stop_rabbitmq_app,
)

pytestmark = [pytest.mark.fault]

OUTAGE = 4.0
"""Seconds RabbitMQ stays down: several reconnection attempts of every client."""


async def test_rabbitmq_restart(rig: Rig) -> None:
    """``rabbitmqctl stop_app`` / ``start_app`` under load: every connection (coordinator
    relay and reply consumer, participants, their relays) comes back; nothing is lost."""
    await rig.start_coordinator()
    await rig.start_participants()
    restored = asyncio.Event()
    load = rig.spawn(rig.load(minimum=40, maximum=120, until=restored))
    try:
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        try:
            await stop_rabbitmq_app()
            await asyncio.sleep(OUTAGE)  # sagas keep being started meanwhile
        finally:
            await ensure_rabbitmq_running(rig.amqp_url)
        rig.notes.append(f"RabbitMQ stopped under load, back after {time.monotonic() - t0:.1f}s")
        await asyncio.sleep(1.5)  # and afterwards
    finally:
        restored.set()
        await load
    totals = await rig.tally(drain_timeout=120)

    assert totals.ok, rig.report(totals)
    rig.assert_alive()


async def test_postgres_restart(rig: Rig) -> None:
    """``pg_ctlcluster ... restart`` under load: every pool and LISTEN connection comes
    back; StartSaga calls refused meanwhile are repeated with their idempotency key."""
    await rig.start_coordinator()
    await rig.start_participants()
    restored = asyncio.Event()
    load = rig.spawn(rig.load(minimum=40, maximum=120, until=restored))
    try:
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        calls = rig.retried_calls
        try:
            await restart_postgres()
        finally:
            await ensure_postgres_running()
        restarted = time.monotonic() - t0
        await asyncio.sleep(2.0)
    finally:
        restored.set()
        await load
    rig.notes.append(
        f"PostgreSQL restarted under load in {restarted:.1f}s; "
        f"{rig.retried_calls - calls} client calls refused meanwhile and repeated"
    )
    totals = await rig.tally(drain_timeout=120)

    assert totals.ok, rig.report(totals)
    rig.assert_alive()
