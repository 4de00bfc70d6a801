"""Replicas and failover (issue 21, item 5): three coordinators on one database and one
vhost under load, one SIGKILLed and not restarted.

One SagaClient is given the three addresses; it starts sagas (with idempotency keys)
while one replica is killed right after it committed a saga's start. The test then
shows, with the suite's tally, that every saga ends as its inputs call for, none lost,
no effect duplicated, no compensation out of order; that the client kept starting
sagas after the kill and no start failed for good; and that the two survivors finished
the work the dead one had in flight: sagas whose start it committed, ended after it
died, with its unpublished commands (outbox rows) published by the others' relays.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from fault.harness import CoordinatorChild, Rig, retry_policy

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
    await rig.start_replicas(REPLICAS)
    participants = await rig.start_participants()
    victim = random.choice(rig.coordinators)
    enough = asyncio.Event()
    load = rig.spawn(
        rig.load(minimum=60, maximum=600, until=enough, workers=4, pause=(0.05, 0.25), **QUICK)
    )
    await asyncio.sleep(2.0)  # every replica serving its share of the load

    assert participants.proc is not None
    participants.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(0.5)
        # Killed just after it committed a start: that saga's steps are all ahead.
        await next_start(victim)
        await victim.kill()
        killed_at = datetime.now(UTC)
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
    republished = await _outbox_rows_published_after(rig.database_url, orphans, killed_at)
    rig.notes.append(
        f"{victim.name} of {REPLICAS} SIGKILLed, not restarted; of the {len(orphans)} sagas "
        f"it started, {finished_by_others} finished by the other two ({timed_out_after} after "
        f"a step timeout they fired; {republished} of its commands published by their "
        f"relays); {after_kill} starts after the kill, {repeats} calls repeated by the test"
    )
    totals = await rig.tally()

    assert totals.ok, rig.report(totals)
    assert not victim.alive and victim.kills == 1
    assert after_kill > 0, rig.report(totals)
    # The dead replica's work in flight was finished by the others: they consumed the
    # replies, fired the timers and published the outbox rows of its sagas.
    assert orphans, f"{victim.name} committed no start of this run (see {victim.log_path})"
    assert finished_by_others > 0 and timed_out_after > 0, rig.report(totals)
    rig.assert_alive(killed=[victim])


async def _outbox_rows_published_after(
    database_url: str, saga_ids: list[str], when: datetime
) -> int:
    """Outbox rows of these sagas written before ``when`` and published after it."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM sagaplane_outbox"
            " WHERE correlation_id = ANY(%s) AND created_at < %s AND sent_at > %s",
            (saga_ids, when, when),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0
