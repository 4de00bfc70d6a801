"""What PostgreSQL and RabbitMQ themselves allow on this machine, measured in the same run.

- **pgbench**: a custom script with the statements of one coordinator transition (as
  ``coordinator/store/repository.py`` runs them for one reply): lock the saga row
  ``FOR UPDATE``, read its steps, update the saga, update one step, insert one history
  row, insert one outbox row (~1.3 KB body, the size of a standard-workload command;
  its NOTIFY trigger fires as in production), commit. It runs on the coordinator's real
  schema (migrations applied to a fresh database) over 10,000 stored sagas, prepared
  statements, ``--clients`` clients.
- **broker**: one aio-pika process publishes persistent ~1.3 KB messages with publisher
  confirms (a window of unconfirmed publishes) to a quorum queue while another consumes
  them with manual acks, one ack per message. messages/s = count / (last consumed - first
  published).

And what one saga cannot go below, for the latency target: pgbench again with ONE
client (the latency of one transition-shaped transaction, commit included), and ONE
message at a time through a quorum queue (publish -> delivered to a consumer, and
publish -> confirmed). A 3-step saga has 6 such hops (3 commands, 3 replies) and 7
such transactions (the start, then per step the participant's and the reply's) one
after the other, so :func:`latency_floor` is a floor with no Python in it at all.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
from aio_pika.abc import AbstractIncomingMessage

from bench.infra import ROOT, Environment, broker_pid, cpu_seconds, run_command
from bench.stats import summary_ms
from bench.stored import grow
from coordinator.store.migrate import migrate

PGBENCH_SCALE = 10_000

_SAGA = "'0' || lpad(:n::text, 25, '0')"

PGBENCH_SCRIPT = f"""\\set n random(1, {PGBENCH_SCALE})
\\set p random(0, 2)
BEGIN;
SELECT *, now() AS db_now FROM sagaplane_sagas WHERE id = {_SAGA} ORDER BY id FOR UPDATE;
SELECT * FROM sagaplane_steps WHERE saga_id = {_SAGA} ORDER BY saga_id, position;
UPDATE sagaplane_sagas SET state = 'started', updated_at = now(), completed_at = NULL,
    deadline_at = NULL WHERE id = {_SAGA};
UPDATE sagaplane_steps SET output = '{{"ok": true}}', status = 'completed', error = NULL,
    attempts = 1, compensation_attempts = 0, token = 'bench-token', executed_at = now(),
    compensated_at = NULL, deadline_at = NULL, outcome_unknown = false
    WHERE saga_id = {_SAGA} AND position = :p;
INSERT INTO sagaplane_history (saga_id, from_state, to_state, step_name, event, reason)
    VALUES ({_SAGA}, 'started', 'started', 'reserve', 'step_completed', NULL);
INSERT INTO sagaplane_outbox (message_id, exchange, routing_key, message_type, body,
    correlation_id)
    VALUES ('bench:' || :n, 'sagaplane.commands', 'payment.charge', 'sagaplane.v1.StepCommand',
    decode(repeat('ab', 1300), 'hex'), {_SAGA});
END;
"""
"""One coordinator transition, as pgbench runs it (one line per statement)."""


def _pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise RuntimeError("pgbench not found (Debian: apt-get install postgresql-client)")


def _one_line_statements(script: str) -> str:
    # pgbench reads one SQL command up to the semicolon; keep meta-commands as they are.
    out: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        if line.startswith("\\"):
            out.append(line)
            continue
        buf.append(line.strip())
        if line.rstrip().endswith(";"):
            out.append(" ".join(buf))
            buf = []
    return "\n".join(out) + "\n"


async def _backend_cpu(admin_url: str, database: str, out: dict[str, float]) -> None:
    """Keep ``out["cpu_s"]`` at the CPU seconds used so far by the backends serving
    ``database`` (sampled, as they end with pgbench; their start-up cost included)."""
    seen: dict[int, float] = {}
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as c:
        while True:
            cur = await c.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
            )
            for (pid,) in await cur.fetchall():
                seen[int(pid)] = max(seen.get(int(pid), 0.0), cpu_seconds(int(pid)))
            out["cpu_s"] = sum(seen.values())
            await asyncio.sleep(0.2)


SAGA_HOPS = 6
"""Broker hops on a 3-step saga's path: 3 commands and 3 replies."""
SAGA_TRANSACTIONS = 7
"""Committed transactions on a 3-step saga's path: the start, and per step the
participant's and the coordinator's applying its reply."""


async def pgbench(
    env: Environment, *, clients: int, seconds: float, single_client_seconds: float = 0.0
) -> dict[str, Any]:
    """Transition-shaped transactions per second on a fresh copy of the coordinator schema;
    with ``single_client_seconds``, then the latency of one client alone."""
    url = await env.create_database("pgbench")
    await migrate(url)
    await grow(url, have=0, want=PGBENCH_SCALE, active=0, history=False)
    script = env.workdir / "transition.pgbench.sql"
    script.write_text(_one_line_statements(PGBENCH_SCRIPT))
    used: dict[str, float] = {"cpu_s": 0.0}
    sampler = asyncio.create_task(_backend_cpu(env.admin_url, env.db_name("pgbench"), used))
    out = await _run_pgbench(script, url, clients=clients, seconds=seconds)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    single = None
    if single_client_seconds > 0:
        alone = await _run_pgbench(script, url, clients=1, seconds=single_client_seconds)
        found = re.search(r"latency average = ([\d.]+) ms", alone)
        single = float(found.group(1)) if found else None
    await env.drop_database("pgbench")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if tps is None:
        raise RuntimeError(f"could not read pgbench's output:\n{out}")
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    transactions = int(done.group(1)) if done else 0
    return {
        "transactions": transactions,
        "backend_cpu_ms_per_tx": round(1000 * used["cpu_s"] / transactions, 3)
        if transactions
        else None,
        "clients": clients,
        "seconds": max(1, round(seconds)),
        "tps": round(float(tps.group(1)), 1),
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "failed_transactions": int(failed.group(1)) if failed else 0,
        "single_client_latency_ms": single,
        "script": str(script),
    }


async def _run_pgbench(script: Path, url: str, *, clients: int, seconds: float) -> str:
    return await run_command(
        _pgbench_binary(),
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(max(1, round(seconds))),
        "-f",
        str(script),
        url,
        within=seconds + 120,
    )


async def broker_hop(
    env: Environment, *, count: int, size: int = 1300, gap: float = 0.005
) -> dict[str, Any]:
    """One persistent message at a time through a quorum queue, on an idle broker:
    publish -> delivered, and publish -> confirmed (ms)."""
    connection = await aio_pika.connect(env.amqp_url)
    async with connection:
        publishing = await connection.channel(publisher_confirms=True)
        consuming = await connection.channel()
        queue = await consuming.declare_queue(
            "bench.hop", durable=True, arguments={"x-queue-type": "quorum"}
        )
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            await arrived.put(time.perf_counter())
            await message.ack()

        tag = await queue.consume(on_message)
        delivered: list[float] = []
        confirmed: list[float] = []
        body = b"x" * size
        for _ in range(count):
            sent = time.perf_counter()
            await publishing.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )
            confirmed.append(time.perf_counter() - sent)
            async with asyncio.timeout(30):
                delivered.append(await arrived.get() - sent)
            await asyncio.sleep(gap)
        await queue.cancel(tag)  # before the delete, or the broker cancels it noisily
        await queue.delete(if_unused=False, if_empty=False)
    return {
        "messages": count,
        "size_bytes": size,
        "delivered_ms": summary_ms(delivered),
        "confirmed_ms": summary_ms(confirmed),
    }


def latency_floor(base: dict[str, Any]) -> dict[str, Any] | None:
    """A 3-step saga's start->completed floor from the latency baselines (None without)."""
    tx = (base.get("pgbench") or {}).get("single_client_latency_ms")
    hop = ((base.get("broker_hop") or {}).get("delivered_ms") or {}).get("p50")
    if tx is None or hop is None:
        return None
    return {
        "transactions": SAGA_TRANSACTIONS,
        "transaction_ms": tx,
        "hops": SAGA_HOPS,
        "hop_p50_ms": hop,
        "floor_ms": round(SAGA_TRANSACTIONS * tx + SAGA_HOPS * hop, 2),
    }


async def broker(
    env: Environment, *, count: int, size: int = 1300, window: int = 256, prefetch: int = 256
) -> dict[str, Any]:
    """Publish-with-confirms + consume-with-ack, one aio-pika process each."""
    common = ["--amqp-url", env.amqp_url, "--queue", "bench.baseline", "--count", str(count)]
    consumer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.broker",
        "consume",
        *common,
        "--prefetch",
        str(prefetch),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert consumer.stdout is not None
    try:
        async with asyncio.timeout(60):
            ready = await consumer.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError(f"broker consumer did not start: {ready!r}")
        beam = broker_pid()
        beam_cpu0 = cpu_seconds(beam) if beam else 0.0
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.broker",
            "publish",
            *common,
            "--size",
            str(size),
            "--window",
            str(window),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(count / 200 + 120):
            pub_out, _ = await publisher.communicate()
            con_out, _ = await consumer.communicate()
        beam_cpu = cpu_seconds(beam) - beam_cpu0 if beam else None
    finally:
        for proc in (consumer,):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    pub = json.loads(pub_out.decode().strip().splitlines()[-1])
    con = json.loads(con_out.decode().strip().splitlines()[-1])
    end_to_end = con["last"] - pub["first"]
    return {
        "messages": count,
        "size_bytes": size,
        "confirm_window": window,
        "prefetch": prefetch,
        "publish_per_s": round(count / (pub["last"] - pub["first"]), 1),
        "consume_per_s": round(count / max(1e-9, con["last"] - con["first"]), 1),
        "messages_per_s": round(count / end_to_end, 1),
        "publisher_cpu_s": round(pub["cpu_s"], 2),
        "consumer_cpu_s": round(con["cpu_s"], 2),
        "publish_failures": pub["failures"],
        "broker_cpu_ms_per_message": round(1000 * beam_cpu / count, 3) if beam_cpu else None,
    }
