"""Replicas and failover (issue 21, item 5): three coordinators on one database and one
vhost under load, one SIGKILLed and not restarted.

One SagaClient is given the three addresses; it starts sagas (with idempotency keys)
while one replica is killed right after it committed a saga's start. Before the kill,
the replica's broker connection (through a TCP proxy) stops answering, so that it dies
holding outbox rows its relay claimed and could not publish. The test then shows, with
the suite's tally, that every saga ends as its inputs call for, none lost, no effect
duplicated, no compensation out of order; that the client kept starting sagas after
the kill and no start failed for good; and that the two survivors finished the work the
dead one had in flight: sagas whose start it committed, ended after it died, and the
outbox rows it held, published by the others' relays after the kill.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from fault.harness import CoordinatorChild, Rig, retry_policy
from helpers.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.fault]

REPLICAS = 3

PAUSED_AFTER_KILL = 2.0
"""Seconds the participants stay paused after the kill: past the 1 s step timeout."""

QUICK: dict[str, Any] = {
    "step_timeout": 1.0,
    "retry": retry_policy(8, 0.05, 1.5, 0.3),
    "compensation_retry": retry_policy(10, 0.05, 1.5, 0.3),
}
"""Step timeouts that fire while the participants are paused, and retries enough to
outlast the pause."""

STARTED = re.compile(r"saga ([0-9A-Z]{26}) started \(")
"""The coordinator's log line for a start it committed (:meth:`StartSaga`)."""


def started_by(child: CoordinatorChild, since: int = 0) -> list[str]:
    """Ids of the sagas whose start ``child`` committed (and logged), in its log since
    the output mark ``since``."""
    return STARTED.findall("\n".join(child.output_since(since)))


async def next_start(child: CoordinatorChild, within: float = 15.0) -> str:
    """The id of the next saga whose start ``child`` commits (read from its log)."""
    mark = child.output_mark()
    async with asyncio.timeout(within):
        while True:
            found = started_by(child, mark)
            if found:
                return found[0]
            await asyncio.sleep(0.005)


async def test_replica_sigkilled_and_not_restarted(rig: Rig) -> None:
    """Three coordinators under load; one SIGKILLed right after committing a start, and
    left dead; the client with the three addresses carries on, the other two finish.

    The participants are paused (SIGSTOP) from a little before the kill to 2 s after it,
    so that the dead replica leaves sagas in flight whose steps time out: their timers
    fire, and their retries are sent, by the survivors."""
    victim_name = random.choice(["coordinator", *(f"coordinator-{i}" for i in (2, 3))])
    amqp = urlsplit(rig.amqp_url)
    assert amqp.hostname is not None and amqp.port is not None
    proxy = TcpProxy(amqp.hostname, amqp.port)
    await proxy.start()
    try:
        await rig.start_replicas(
            REPLICAS,
            env={
                victim_name: {
                    # Its broker connection through the proxy; its database sessions named,
                    # to find the rows its relay holds.
                    "SAGAPLANE_AMQP_URL": _through(rig.amqp_url, proxy.port),
                    "SAGAPLANE_DATABASE_URL": _named(rig.database_url, VICTIM_SESSIONS),
                }
            },
        )
        await _replica_sigkilled_holding_rows(rig, proxy, victim_name)
    finally:
        await proxy.cut()


async def _replica_sigkilled_holding_rows(rig: Rig, proxy: TcpProxy, victim_name: str) -> None:
    participants = await rig.start_participants()
    [victim] = [c for c in rig.coordinators if c.name == victim_name]
    enough = asyncio.Event()
    load = rig.spawn(
        rig.load(minimum=60, maximum=600, until=enough, workers=4, pause=(0.05, 0.25), **QUICK)
    )
    await asyncio.sleep(2.0)  # every replica serving its share of the load

    assert participants.proc is not None
    participants.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)
        # Its broker stops answering: the next batch its relay claims is never confirmed,
        # and stays locked by its transaction (for the relay's 30 s confirm timeout).
        proxy.hold()
        held = await _rows_held_by(rig.database_url, VICTIM_SESSIONS)
        # Killed just after it committed a start: that saga's steps are all ahead.
        await next_start(victim)
        # Taken before the signal: a row it held can only be claimed by another relay
        # once its transaction is gone, so by a transaction begun after this instant.
        killed_at = datetime.now(UTC)
        await victim.kill()
        # The broker notices the dead connection (as its heartbeat check would, later)
        # and gives the replies that replica had taken to the others.
        await proxy.cut()
        before_kill = len(rig.started)
        repeats_before_kill = rig.retried_calls
        await asyncio.sleep(PAUSED_AFTER_KILL)
    finally:
        participants.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(2.0)
    enough.set()
    await load  # raises if a start failed for good
    after_kill = len(rig.started) - before_kill
    repeats = rig.retried_calls - repeats_before_kill
    await rig.drain()

    ours = {s.saga_id for s in rig.started.values()}
    orphans = [i for i in dict.fromkeys(started_by(victim)) if i in ours]
    finished_by_others = timed_out_after = 0
    for saga_id in orphans:
        saga = await rig.get(saga_id, history=True)
        finished_by_others += bool(saga.updated_at and saga.updated_at > killed_at)
        timed_out_after += any(
            h.at and h.at > killed_at and "timed out" in h.reason for h in saga.history
        )
    republished = await _published_after(rig.database_url, held, killed_at)
    rig.notes.append(
        f"{victim.name} of {REPLICAS} SIGKILLed, not restarted, its broker silent; of the "
        f"{len(orphans)} sagas it started, {finished_by_others} finished by the other two "
        f"({timed_out_after} after a step timeout they fired); its relay held "
        f"{len(held)} outbox row(s) unpublished, {republished} published by theirs after "
        f"the kill; {after_kill} "
        f"starts after the kill, {repeats} calls repeated by the test"
    )
    totals = await rig.tally()

    assert totals.ok, rig.report(totals)
    assert not victim.alive and victim.kills == 1
    assert after_kill > 0, rig.report(totals)
    # The dead replica's work in flight was finished by the others: they consumed the
    # replies, fired the timers and published the outbox rows of its sagas.
    assert orphans, f"{victim.name} committed no start of this run (see {victim.log_path})"
    assert finished_by_others > 0 and timed_out_after > 0, rig.report(totals)
    assert republished == len(held), rig.report(totals)
    rig.assert_alive(killed=[victim])


VICTIM_SESSIONS = "sagaplane-failover-victim"
"""The application_name of the dead replica's database sessions."""


def _through(amqp_url: str, port: int) -> str:
    """``amqp_url`` by way of the proxy on ``port`` (same credentials and vhost)."""
    parts = urlsplit(amqp_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _named(database_url: str, application_name: str) -> str:
    """``database_url`` whose sessions carry ``application_name``."""
    joiner = "&" if "?" in database_url else "?"
    return f"{database_url}{joiner}application_name={application_name}"


# Unsent rows whose lock is held by a transaction of the named sessions: a row a relay
# claimed (FOR UPDATE) has that transaction's id as its xmax while the lock lasts.
HELD = """
SELECT o.id, o.xmax::text FROM sagaplane_outbox o
JOIN pg_stat_activity a ON a.backend_xid = o.xmax
WHERE o.sent_at IS NULL AND a.application_name = %s AND a.datname = current_database()
ORDER BY o.id
"""


async def _rows_held_by(
    database_url: str, application_name: str, within: float = 15.0, steady: float = 0.3
) -> list[int]:
    """The outbox rows that the sessions named ``application_name`` hold locked, once
    there are some (a relay claims a batch at its next wake-up): those held by the same
    transaction ``steady`` seconds apart, so that a short transaction that happened to
    lock a row (a timer proving a delivery) is not taken for the stuck relay's."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:

        async def locked() -> set[tuple[int, str]]:
            cur = await conn.execute(HELD, (application_name,))
            return {(int(row_id), xid) for row_id, xid in await cur.fetchall()}

        async with asyncio.timeout(within):
            while True:
                first = await locked()
                if first:
                    await asyncio.sleep(steady)
                    held = first & await locked()
                    if held:
                        return sorted(row_id for row_id, _ in held)
                await asyncio.sleep(0.02)


async def _published_after(database_url: str, ids: list[int], when: datetime) -> int:
    """How many of these outbox rows were published, by a transaction begun after ``when``."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM sagaplane_outbox WHERE id = ANY(%s) AND sent_at > %s",
            (ids, when),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0
