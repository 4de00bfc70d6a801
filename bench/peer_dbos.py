"""The peer of ``--phases peers``: DBOS Transact doing the standard workload's work.

``python -m bench.peer_dbos --system-database-url URL --app-database-url URL --out FILE``
runs, in this one process, a DBOS workflow of 3 transaction steps (``orders.create``,
``inventory.reserve``, ``payment.charge``), each ONE small INSERT into the application
database (the table the bench participants write, ``bench.participant.SCHEMA``), the
1 KB context (``bench.workload.make_context``) as the workflow's input. It measures:

- a closed loop: ``--workflows`` workflows, ``--concurrency`` in flight (each of that many
  threads starts the next one as soon as its last one returned);
- one at a time: ``--one-at-a-time`` workflows in a row, each timed from call to return.

The harness creates both databases fresh and drops them afterwards; the figures go to
``--out`` as JSON. DBOS's synchronous API is used (threads): in a prototype on this
machine its asyncio API (``AsyncSQLAlchemyDatasource``, async workflows) completed half
the workflows per second (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from bench.infra import BackendMeter, cpu_seconds
from bench.participant import SCHEMA
from bench.stats import summary_ms
from bench.workload import CONTEXT_BYTES, database_activity, make_context

T = TypeVar("T")

STEPS = ("orders.create", "inventory.reserve", "payment.charge")
_INSERT = "INSERT INTO bench_effects (saga_id, action) VALUES (:saga_id, :action)"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peer_dbos")
    p.add_argument("--system-database-url", required=True, help="DBOS's own (fresh) database")
    p.add_argument("--app-database-url", required=True, help="the steps' (fresh) database")
    p.add_argument("--admin-url", required=True, help="to find the PostgreSQL backends' pids")
    p.add_argument("--out", type=Path, required=True, help="the figures, as JSON")
    p.add_argument("--workflows", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--one-at-a-time", type=int, default=300)
    p.add_argument("--pool-size", type=int, default=20, help="each of DBOS's two pools")
    p.add_argument("--context-bytes", type=int, default=CONTEXT_BYTES)
    p.add_argument("--event-loop", help="ignored (the harness passes it to every process)")
    return p.parse_args()


def main() -> None:
    """Entry point."""
    args = _parse()
    logging.basicConfig(level=logging.WARNING)
    import sqlalchemy as sa
    from dbos import DBOS, SQLAlchemyDatasource

    app = SQLAlchemyDatasource.create(
        args.app_database_url,
        engine_kwargs={"pool_size": args.pool_size, "max_overflow": 0},
    )
    with app.engine.begin() as c:
        c.execute(sa.text(SCHEMA))
    insert = sa.text(_INSERT)

    def transaction(action: str) -> Any:
        # READ COMMITTED as the bench participants' transactions (DBOS's default is
        # SERIALIZABLE; for one INSERT it makes no difference but its retry path).
        @app.transaction(name=action, isolation_level="READ COMMITTED")
        def run(context: dict[str, Any]) -> dict[str, bool]:
            app.sql_session().execute(insert, {"saga_id": DBOS.workflow_id, "action": action})
            return {"ok": True}

        return run

    steps = [transaction(action) for action in STEPS]

    @DBOS.workflow(name="bench.order")
    def order(context: dict[str, Any]) -> None:
        for run in steps:
            run(context)

    DBOS(
        config={
            "name": "sagaplane-bench-peer",
            "system_database_url": args.system_database_url,
            "sys_db_pool_size": args.pool_size,
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    try:
        context = make_context(args.context_bytes)
        closed_loop(order, context, args.warmup, min(args.concurrency, max(1, args.warmup)))
        databases = [args.system_database_url.rsplit("/", 1)[-1]]
        databases.append(args.app_database_url.rsplit("/", 1)[-1])
        backends = BackendMeter(args.admin_url, databases)
        _retrying(backends.start)
        before = _retrying(lambda: database_activity(args.admin_url, databases))
        cpu0 = cpu_seconds(os.getpid())
        closed = closed_loop(order, context, args.workflows, args.concurrency)
        process_cpu = cpu_seconds(os.getpid()) - cpu0
        after = _retrying(lambda: database_activity(args.admin_url, databases))
        postgres_cpu = sum(_retrying(backends.stop).values())
        # pg_stat_database as the throughput run's steady window reads it (a backend
        # publishes its counts at most once a second: rough, but the same on both sides).
        closed["per_workflow"] = {
            role: {
                key: round((after[db][key] - before[db][key]) / max(1, closed["workflows"]), 2)
                for key in ("commits", "inserted", "updated", "fetched")
            }
            for role, db in zip(("system", "app"), databases, strict=True)
            if db in after and db in before
        }
        n = max(1, closed["workflows"])
        closed["dbos_cpu_ms_per_workflow"] = round(1000 * process_cpu / n, 3)
        closed["postgres_cpu_ms_per_workflow"] = round(1000 * postgres_cpu / n, 3)
        closed["cpu_ms_per_workflow"] = round(1000 * (process_cpu + postgres_cpu) / n, 3)
        single = []
        for _ in range(args.one_at_a_time):
            t0 = time.perf_counter()
            order(context)
            single.append(time.perf_counter() - t0)
        figures = {
            "version": _version(),
            "api": "sync (threads)",
            "pool_size": args.pool_size,
            "context_bytes": len(json.dumps(context)),
            "closed_loop": closed,
            "one_at_a_time_ms": summary_ms(single),
        }
    finally:
        DBOS.destroy()
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


def closed_loop(order: Any, context: dict[str, Any], workflows: int, concurrency: int) -> Any:
    """``workflows`` workflows, ``concurrency`` threads each running one after another."""
    remaining = iter(range(workflows))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                order(context)
            except Exception as exc:  # counted and shown; the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    return {
        "workflows": len(latencies),
        "concurrency": concurrency,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "wall_s": round(wall, 3),
        "workflows_per_s": round(len(latencies) / max(wall, 1e-9), 1),
        "latency_ms": summary_ms(latencies),
    }


def _retrying(read: Callable[[], Awaitable[T]], attempts: int = 20) -> T:
    """``read()`` run to its end, tried again for a while if PostgreSQL has no free
    connection (other suites on a shared machine take them all at times)."""
    for attempt in range(attempts):
        try:
            return asyncio.run(read())  # type: ignore[arg-type]
        except psycopg.OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


if __name__ == "__main__":
    main()
