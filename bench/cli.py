"""``python -m bench``: the standard-workload benchmark, end to end (see bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import grpc
import psycopg

from bench import (
    baselines,
    growth,
    observability,
    peers,
    report,
    security,
    starts,
    stored,
    variants,
    watchers,
)
from bench.breakdown import breakdown
from bench.infra import (
    ROOT,
    SERVICES,
    BackendMeter,
    Environment,
    Meter,
    broker_pid,
    clean_stale,
    disturbances,
    log_offsets,
    peak_rss_mb,
    rss_mb,
    run_command,
    wait_for_services,
)
from bench.participant import EMIT_EVENTS_ENV
from bench.profile import Recorder, render, summarize
from bench.stats import ratio
from bench.workload import (
    CONTEXT_BYTES,
    Load,
    Sample,
    SteadyWindow,
    TerminalWatcher,
    analyse,
    closed_loop,
    database_counts,
    open_loop,
    steps_in,
)
from sagaplane import SagaClient, defaults
from sagaplane.runtime import EVENT_LOOPS
from sagaplane.testing import Child, free_port, rabbitmqctl, wait_for_consumers
from sagaplane.topology import participant_queue

BROKER = "rabbitmq (whole broker)"
"""The broker's name among a run's metered processes."""

PHASES = (
    "baselines",
    "throughput",
    "latency",
    "fanout",
    "sweep",
    "scaling",
    "starts",
    "stored",
    "watchers",
    "observability",
    "events",
    "security",
    "steps",
    "context",
    "waiting",
    "peers",
)

DEFAULTS: dict[str, Any] = {
    "sagas": 5000,
    "concurrency": 200,
    "warmup": 300,
    "rate": 100.0,
    "duration": 30.0,
    "sweep": "0.25,0.5,0.75,0.9",
    "sweep_duration": 10.0,
    "stored": "10000,1000000",
    "get_calls": 2000,
    "list_calls": 400,
    "pgbench_seconds": 10.0,
    "broker_messages": 30000,
    "hop_messages": 300,
    "drain_timeout": 60.0,
    "start_sagas": 5000,
    "start_chunk": 500,
    "observability_sagas": 5000,
    "variant_rounds": 3,
    "peer_sagas": 3000,
    "peer_workflows": 1500,
    "peer_one_at_a_time": 300,
    "peer_duration": 20.0,
    "steps": "3,20,100",
    "steps_duration": 15.0,
    "context_sizes": "1024,65000",
    "context_duration": 10.0,
    "waiting_sagas": 10000,
    "waiting_idle": 20.0,
    "waiting_calls": 300,
    "waiting_reference": 1000,
}
QUICK: dict[str, Any] = {
    "sagas": 300,
    "concurrency": 100,
    "warmup": 50,
    "rate": 100.0,
    "duration": 3.0,
    "sweep": "",
    "sweep_duration": 5.0,
    "stored": "10000,20000",
    "get_calls": 150,
    "list_calls": 60,
    "pgbench_seconds": 2.0,
    "broker_messages": 3000,
    "hop_messages": 50,
    "drain_timeout": 20.0,
    "start_sagas": 600,
    "start_chunk": 100,
    "observability_sagas": 300,
    "variant_rounds": 1,
    "peer_sagas": 300,
    "peer_workflows": 300,
    "peer_one_at_a_time": 50,
    "peer_duration": 6.0,
    "steps": "3,20,100",
    "steps_duration": 6.0,
    "context_sizes": "1024,65000",
    "context_duration": 5.0,
    "waiting_sagas": 1000,
    "waiting_idle": 5.0,
    "waiting_calls": 100,
    "waiting_reference": 300,
}


_T0 = time.monotonic()
PROGRESS: list[tuple[float, str]] = []


def _progress(message: str) -> None:
    """A progress line on stdout, stamped with the seconds since the run started."""
    at = round(time.monotonic() - _T0, 1)
    PROGRESS.append((at, message))
    print(f"[{at:6.1f}s] {message}", flush=True)


def _d(key: str) -> str:
    return f"[{DEFAULTS[key]}; quick {QUICK[key] if QUICK[key] != '' else 'none'}]"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Sagaplane's standard saga workload against the local PostgreSQL and "
        "RabbitMQ, with baselines, and report throughput, latency and resources.",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    p.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    g = p.add_argument_group("workload")
    g.add_argument("--sagas", type=int, help="throughput run: sagas " + _d("sagas"))
    g.add_argument("--concurrency", type=int, help="throughput run: in flight " + _d("concurrency"))
    g.add_argument("--warmup", type=int, help="sagas run before measuring " + _d("warmup"))
    g.add_argument("--rate", type=float, help="latency run: sagas/s " + _d("rate"))
    g.add_argument("--duration", type=float, help="latency run: seconds " + _d("duration"))
    g.add_argument(
        "--sweep",
        help="open-loop rates as fractions of the measured throughput " + _d("sweep"),
    )
    g.add_argument(
        "--sweep-duration", type=float, help="seconds per sweep rate " + _d("sweep_duration")
    )
    g.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="fraction of sagas whose last step fails (compensation) [0]",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        help="open loop: seconds to wait for the last sagas to end " + _d("drain_timeout"),
    )
    g.add_argument(
        "--poll-interval",
        type=float,
        default=0.02,
        help="seconds between looks at the coordinator DB for ended sagas [0.02]",
    )
    g = p.add_argument_group("starting sagas (--phases starts)")
    g.add_argument("--start-sagas", type=int, help="sagas started each way " + _d("start_sagas"))
    g.add_argument("--start-chunk", type=int, help="sagas per StartSagas call " + _d("start_chunk"))
    g = p.add_argument_group(
        "variants compared: observability's, events', security's and a second "
        "coordinator's cost (--phases observability,events,security,scaling)"
    )
    g.add_argument(
        "--observability-sagas",
        type=int,
        help="closed-loop sagas per run of a variant (observability: metrics off, metrics "
        "on, tracing on; events: off, on; security: off, on; scaling: 1 coordinator, 2) "
        + _d("observability_sagas"),
    )
    g.add_argument(
        "--variant-rounds",
        type=int,
        help="rounds of every variant, the order alternating (A B C, C B A, ...), each run "
        "on a fresh system; judged on the median of per-round ratios " + _d("variant_rounds"),
    )
    g.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between scrapes of every /metrics with metrics on (Prometheus' "
        "default is 15) [1]",
    )
    g.add_argument(
        "--tracing-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable of the tracing variant's processes (repeatable; "
        "on top of OTEL_TRACES_EXPORTER=console and the harness's OTEL_* variables)",
    )
    g = p.add_argument_group("the peer, DBOS Transact (--phases peers)")
    g.add_argument(
        "--peer-workflows", type=int, help="DBOS closed-loop workflows " + _d("peer_workflows")
    )
    g.add_argument("--peer-concurrency", type=int, help="DBOS workflows in flight [--concurrency]")
    g.add_argument(
        "--peer-pool-size",
        type=int,
        default=20,
        help="each of DBOS's two connection pools (system, app): 40 in all, as Sagaplane's"
        " coordinator and 3 participants have by default [20]",
    )
    g.add_argument(
        "--peer-one-at-a-time",
        type=int,
        help="DBOS workflows run one after another for its latency " + _d("peer_one_at_a_time"),
    )
    g.add_argument(
        "--peer-sagas",
        type=int,
        help="Sagaplane closed loop when the throughput phase is not run " + _d("peer_sagas"),
    )
    g.add_argument(
        "--peer-rate",
        type=float,
        default=5.0,
        help="Sagaplane latency run, sagas/s (the latency phase's is used at that rate) [5]",
    )
    g.add_argument(
        "--peer-duration", type=float, help="seconds of that latency run " + _d("peer_duration")
    )
    g = p.add_argument_group("cost as the work grows (--phases steps,context,waiting)")
    g.add_argument("--steps", help="steps per saga, in a line " + _d("steps"))
    g.add_argument(
        "--steps-rate",
        type=float,
        default=60.0,
        help="steps/s offered whatever the saga's length (sagas/s = this / steps) [60]",
    )
    g.add_argument(
        "--steps-duration", type=float, help="seconds per length " + _d("steps_duration")
    )
    g.add_argument("--context-sizes", help="context bytes " + _d("context_sizes"))
    g.add_argument("--context-rate", type=float, default=20.0, help="sagas/s offered per size [20]")
    g.add_argument(
        "--context-duration", type=float, help="seconds per size " + _d("context_duration")
    )
    g.add_argument("--waiting-sagas", type=int, help="sagas left waiting " + _d("waiting_sagas"))
    g.add_argument(
        "--waiting-idle",
        type=float,
        help="seconds the coordinator's CPU is read with them waiting " + _d("waiting_idle"),
    )
    g.add_argument(
        "--waiting-calls",
        type=int,
        help="StartSaga and GetSaga calls, idle and with them waiting " + _d("waiting_calls"),
    )
    g.add_argument(
        "--waiting-reference",
        type=int,
        help="closed-loop sagas the drain is compared with " + _d("waiting_reference"),
    )
    g = p.add_argument_group("stored sagas")
    g.add_argument("--stored", help="stored-saga counts to time reads at " + _d("stored"))
    g.add_argument("--active", type=int, default=500, help="active sagas among them [500]")
    g.add_argument("--get-calls", type=int, help="GetSaga calls per count " + _d("get_calls"))
    g.add_argument("--list-calls", type=int, help="ListActive calls per count " + _d("list_calls"))
    g = p.add_argument_group("baselines")
    g.add_argument("--pgbench-clients", type=int, default=8)
    g.add_argument(
        "--pgbench-seconds",
        type=float,
        help="pgbench run at --pgbench-clients; half as long with 1 client "
        + _d("pgbench_seconds"),
    )
    g.add_argument("--broker-messages", type=int, help=_d("broker_messages"))
    g.add_argument(
        "--hop-messages",
        type=int,
        help="messages sent one at a time for the broker's latency " + _d("hop_messages"),
    )
    g = p.add_argument_group("system under test")
    g.add_argument("--coordinator-pool-size", type=int, help="SAGAPLANE_POOL_SIZE [its default]")
    g.add_argument("--coordinator-prefetch", type=int, help="SAGAPLANE_PREFETCH [its default]")
    g.add_argument("--participant-prefetch", type=int, default=32, help="[SDK default 32]")
    g.add_argument("--participant-pool-size", type=int, default=10, help="[SDK default 10]")
    g.add_argument(
        "--db-socket",
        metavar="DIR",
        help="experiment: processes under test reach PostgreSQL through the Unix socket in "
        "DIR (e.g. /var/run/postgresql) instead of TCP",
    )
    g.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop of the coordinator(s) and participants (their default: uvloop)",
    )
    g = p.add_argument_group("profiling (py-spy, needs root or ptrace rights)")
    g.add_argument(
        "--profile",
        action="store_true",
        help="record the coordinator and one participant during the throughput run",
    )
    g.add_argument("--profile-participant", choices=SERVICES, default="orders")
    g.add_argument("--profile-rate", type=int, default=100)
    g.add_argument("--profile-native", action="store_true", help="include native frames")
    g.add_argument(
        "--profile-gil",
        action="store_true",
        help="only samples holding the GIL (py-spy --gil): Python's CPU, without the waits "
        "in native code that py-spy cannot tell from work",
    )
    g = p.add_argument_group("where")
    g.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="an admin connection; fresh databases are created beside it",
    )
    g.add_argument(
        "--amqp-url",
        default=os.environ.get("BENCH_AMQP_URL", defaults.AMQP_URL),
        help="RabbitMQ; a fresh vhost is created (rabbitmqctl)",
    )
    g.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    g.add_argument("--keep", action="store_true", help="keep databases and vhost afterwards")
    g.add_argument(
        "--clean-stale",
        action="store_true",
        help="only remove the databases and vhosts that crashed runs left behind, then exit",
    )
    g.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.phase_set = {x.strip() for x in args.phases.split(",") if x.strip()}
    unknown = args.phase_set - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if args.variant_rounds < 1:
        p.error("--variant-rounds must be at least 1")
    return args


@dataclass
class System:
    """The processes of the standard workload."""

    coordinator_url: str
    coordinators: list[Child]
    targets: list[str]
    participants: dict[str, Child]
    credentials: grpc.ChannelCredentials | None = None
    """TLS credentials of the harness's clients (None: plaintext gRPC)."""
    token: str | None = None
    """The bearer token of the harness's clients (None: ``SagaClient``'s default)."""


def _coordinator(
    env: Environment,
    args: argparse.Namespace,
    db_url: str,
    n: int,
    extra: Mapping[str, str] | None = None,
    name: str | None = None,
) -> tuple[Child, str]:
    target = f"127.0.0.1:{free_port()}"
    cenv = {
        "SAGAPLANE_DATABASE_URL": _sut_url(args, db_url),
        "SAGAPLANE_AMQP_URL": env.amqp_url,
        "SAGAPLANE_LISTEN": target,
        "SAGAPLANE_GRACE": "2",
    }
    if args.coordinator_pool_size:
        cenv["SAGAPLANE_POOL_SIZE"] = str(args.coordinator_pool_size)
    if args.coordinator_prefetch:
        cenv["SAGAPLANE_PREFETCH"] = str(args.coordinator_prefetch)
    cenv |= extra or {}
    return _python(env, args, "coordinator", env=cenv, name=name or f"coordinator-{n}"), target


def _sut_url(args: argparse.Namespace, url: str) -> str:
    """The database URL the processes under test get: over TCP as given, or through the
    Unix socket in ``--db-socket``."""
    if not args.db_socket:
        return url
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    query = f"host={quote(args.db_socket, safe='/')}&port={parts.port or 5432}"
    return urlunsplit((parts.scheme, user, parts.path, query, ""))


def _python(
    environment: Environment,
    args: argparse.Namespace,
    module: str,
    *argv: str,
    env: dict[str, str] | None = None,
    name: str,
) -> Child:
    argv = (*argv, "--event-loop", args.event_loop)
    return environment.python(module, *argv, env=env, name=name)


async def _start_coordinator(
    process: Child,
    target: str,
    within: float = 90,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Start a coordinator and wait until its health says SERVING (which it does once
    migrated and consuming; ChildExited if it exits first). Health needs no token, but
    a coordinator serving TLS needs ``credentials``."""
    await process.start()
    async with SagaClient(target, credentials=credentials) as client:
        try:
            await client.wait_until_serving(within, alive=process.check_alive)
        except TimeoutError:
            raise TimeoutError(
                f"{process.name} not serving after {within:g}s:\n{process.tail(30)}"
            ) from None


async def _wait_consuming(
    env: Environment, participants: dict[str, Child], within: float = 90
) -> None:
    """Until every participant consumes its queue (ChildExited if one exits first)."""
    queues = [participant_queue(service) for service in participants]
    try:
        async with asyncio.timeout(within):
            await wait_for_consumers(
                env.amqp_url, queues, alive=lambda: env.check_alive(participants.values())
            )
    except TimeoutError:
        tails = "".join(f"\n{p.name}:\n{p.tail(30)}" for p in participants.values())
        raise TimeoutError(f"participants not consuming after {within:g}s:{tails}") from None


async def start_system(
    env: Environment,
    args: argparse.Namespace,
    *,
    prefix: str = "",
    coordinator_env: Mapping[str, str] | None = None,
    participant_envs: Sequence[Mapping[str, str]] = (),
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> System:
    """The coordinator and the participants, on fresh databases (named with ``prefix``,
    as are the processes), with extra environment variables if given (the participants'
    one mapping each, in :data:`SERVICES` order). ``credentials`` and ``token`` are what
    the harness's clients need to reach a coordinator that serves TLS and checks tokens."""
    coordinator_url = await env.create_database(f"{prefix}coordinator")
    participants: dict[str, Child] = {}
    for n, service in enumerate(SERVICES):
        url = await env.create_database(f"{prefix}{service}")
        participants[service] = _python(
            env,
            args,
            "bench.participant",
            service,
            "--amqp-url",
            env.amqp_url,
            "--database-url",
            _sut_url(args, url),
            "--prefetch",
            str(args.participant_prefetch),
            "--pool-size",
            str(args.participant_pool_size),
            env=dict(participant_envs[n]) if n < len(participant_envs) else None,
            name=f"{prefix}participant-{service}",
        )
    coordinator, target = _coordinator(
        env, args, coordinator_url, 1, coordinator_env, name=f"{prefix}coordinator-1"
    )
    await asyncio.gather(*(p.start() for p in participants.values()))
    await asyncio.gather(
        _start_coordinator(coordinator, target, credentials=credentials),
        _wait_consuming(env, participants),
    )
    return System(coordinator_url, [coordinator], [target], participants, credentials, token)


def system_meters(
    env: Environment, args: argparse.Namespace, processes: Iterable[Child], **more: int
) -> tuple[Meter, BackendMeter]:
    """The meters of a system under test: ``processes`` (and ``more``, name -> pid) with
    the broker counted whole, and the PostgreSQL backends of the run's databases."""
    pids = {p.name: p.pid for p in processes} | more
    broker = broker_pid()
    if broker is not None:
        pids[BROKER] = broker
    return Meter(pids), BackendMeter(args.database_url, list(env.databases))


async def backends_cpu(backends: BackendMeter) -> dict[str, float]:
    """The backends' CPU seconds per database since :meth:`BackendMeter.start`; none
    when the database went away (the run is flagged as disturbed anyway)."""
    try:
        return await backends.stop()
    except psycopg.Error:
        return {}


async def measured_closed_loop(
    env: Environment,
    system: System,
    args: argparse.Namespace,
    watcher: TerminalWatcher,
    *,
    targets: list[str],
    profile: bool,
    label: str,
    on_started: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One closed-loop run with its resources; returns (figures, resources).
    ``on_started`` is called with each saga's id as it starts."""
    watched = [*system.coordinators, *system.participants.values()]
    meter, backends = system_meters(env, args, watched, **{"harness (load + poll)": os.getpid()})
    offsets = log_offsets(watched)
    recorders: list[Recorder] = []
    if profile:
        stem = env.workdir / "profile"
        recorders.append(
            Recorder(
                system.coordinators[0].pid,
                stem.with_name("profile-coordinator.txt"),
                rate=args.profile_rate,
                native=args.profile_native,
                gil=args.profile_gil,
            )
        )
        part = system.participants[args.profile_participant]
        recorders.append(
            Recorder(
                part.pid,
                stem.with_name(f"profile-{part.name}.txt"),
                rate=args.profile_rate,
                native=args.profile_native,
                gil=args.profile_gil,
            )
        )
        await asyncio.gather(*(r.start() for r in recorders))
    await backends.start()
    meter.start()
    window = SteadyWindow(args.sagas, args.database_url, list(env.databases))
    async with Load(targets, fail_rate=args.fail_rate, on_started=on_started) as load:
        samples = await closed_loop(
            load, watcher, sagas=args.sagas, concurrency=args.concurrency, on_end=window.ended
        )
    try:
        steady = await window.result()
    except psycopg.Error as exc:
        steady = {"error": str(exc)}
    used = await meter.stop()
    backend_cpu = await backends_cpu(backends)
    for database, cpu in backend_cpu.items():
        name = f"postgres: {database.removeprefix(env.prefix + '_')}"
        used["processes"][name] = {"cpu_s": cpu, "peak_rss_mb": None}
    await asyncio.gather(*(r.stop() for r in recorders))
    env.check_alive([*system.coordinators, *system.participants.values()])
    figures = analyse(samples)
    figures["steady"] = steady
    figures["disturbed"] = disturbances(watched, offsets) + watcher.take_troubles()
    figures["breakdown"] = await _breakdown(env, system, samples)
    figures["coordinators"] = len(targets)
    figures["concurrency"] = args.concurrency
    ids = [s.saga_id for s in samples if s.saga_id]
    figures["db"] = await database_counts(system.coordinator_url, ids)
    figures["profiles"] = [str(r.output) for r in recorders]
    for r in recorders:
        if r.output.exists():
            print(render(summarize(r.output), rate=r.rate, title=f"profile {r.output.name}"))
    _progress(
        f"  {label}: {figures['sagas_per_s']} sagas/s, p50 "
        f"{figures['start_to_terminal_ms']['p50']} ms"
    )
    n = max(1, figures["terminal"])
    total_cpu = 0.0
    for name, p in used["processes"].items():
        p["cpu_s_per_1000_sagas"] = round(1000 * p["cpu_s"] / n, 2)
        p["cpu_pct"] = round(100 * p["cpu_s"] / max(1e-9, used["wall_s"]), 1)
        if "harness" not in name:
            total_cpu += p["cpu_s"]
    used["sagas"] = n
    ours = sum(p["cpu_s"] for p in used["processes"].values())
    cpus = os.cpu_count() or 1
    # What the rest of the machine used meanwhile (other users, kernel threads, PostgreSQL's
    # own background processes): the noise in these figures.
    used["others_cpu_pct"] = round(
        100 * max(0.0, used["machine_busy_cpu_s"] - ours) / max(1e-9, cpus * used["wall_s"]), 1
    )
    # The system under test: coordinator(s), participants, their PostgreSQL backends and
    # the broker; not the harness (load generator and its polling backend).
    used["total_cpu_ms_per_saga"] = round(1000 * total_cpu / n, 3)
    return figures, used


async def _breakdown(env: Environment, system: System, samples: list[Sample]) -> dict[str, Any]:
    due = {s.saga_id: s.due for s in samples if s.saga_id and s.terminal is not None}
    try:
        return await breakdown(system.coordinator_url, {s: env.db_url(s) for s in SERVICES}, due)
    except psycopg.Error as exc:
        return {"error": str(exc)}


async def measured_open_loop(
    env: Environment,
    system: System,
    args: argparse.Namespace,
    watcher: TerminalWatcher,
    *,
    rate: float,
    duration: float,
    shape: str = "standard",
) -> dict[str, Any]:
    pids = {p.name: p.pid for p in system.coordinators}
    meter = Meter(pids)
    watched = [*system.coordinators, *system.participants.values()]
    offsets = log_offsets(watched)
    meter.start()
    async with Load(system.targets[:1], fail_rate=args.fail_rate, shape=shape) as load:
        samples = await open_loop(
            load, watcher, rate=rate, duration=duration, drain_timeout=args.drain_timeout
        )
    used = await meter.stop()
    figures = analyse(samples)
    figures["disturbed"] = disturbances(watched, offsets) + watcher.take_troubles()
    figures["breakdown"] = await _breakdown(env, system, samples)
    figures["rate"] = rate
    figures["duration_s"] = duration
    n = max(1, figures["terminal"])
    figures["coordinator_cpu_s_per_1000_sagas"] = round(
        1000 * sum(p["cpu_s"] for p in used["processes"].values()) / n, 2
    )
    _progress(
        f"  open loop {rate:g}/s: achieved {figures['sagas_per_s']}/s, p50 "
        f"{figures['start_to_terminal_ms']['p50']} ms, p99 "
        f"{figures['start_to_terminal_ms']['p99']} ms"
    )
    return figures


async def system_phases(
    env: Environment, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    _progress("starting 3 participants and a coordinator ...")
    system = await start_system(env, args)
    try:
        await _system_runs(env, args, results, system)
    finally:
        await env.stop_processes([*system.coordinators, *system.participants.values()])


async def _system_runs(
    env: Environment, args: argparse.Namespace, results: dict[str, Any], system: System
) -> None:
    phases = args.phase_set
    async with TerminalWatcher(system.coordinator_url, args.poll_interval) as watcher:
        if args.warmup:
            _progress(f"warm-up: {args.warmup} sagas")
            async with Load(system.targets, fail_rate=args.fail_rate) as load:
                await closed_loop(
                    load, watcher, sagas=args.warmup, concurrency=min(args.concurrency, args.warmup)
                )
            watcher.take_troubles()
        if "throughput" in phases:
            _progress(f"throughput: {args.sagas} sagas, {args.concurrency} in flight")
            figures, used = await measured_closed_loop(
                env,
                system,
                args,
                watcher,
                targets=system.targets,
                profile=args.profile,
                label="1 coordinator",
            )
            results["throughput"] = figures
            results["resources"] = used
        if "latency" in phases:
            _progress(f"latency: {args.rate:g} sagas/s for {args.duration:g} s")
            results["latency"] = await measured_open_loop(
                env, system, args, watcher, rate=args.rate, duration=args.duration
            )
        if "fanout" in phases:
            # Below capacity, so that the latency is the saga's depth, not queueing.
            rate = max(1.0, min(args.rate, 20.0))
            runs = {}
            for shape in ("fanout", "line4"):
                _progress(f"fanout: {shape} sagas, {rate:g}/s for {args.duration:g} s")
                runs[shape] = await measured_open_loop(
                    env, system, args, watcher, rate=rate, duration=args.duration, shape=shape
                )
            results["fanout"] = {
                **runs,
                "ratio": {
                    q: ratio(
                        runs["fanout"]["start_to_terminal_ms"].get(q),
                        runs["line4"]["start_to_terminal_ms"].get(q),
                    )
                    for q in ("p50", "p99")
                },
            }
        fractions = [float(x) for x in str(args.sweep).split(",") if x.strip()]
        if "sweep" in phases and fractions:
            top = results.get("throughput", {}).get("sagas_per_s") or args.rate * 2
            results["sweep"] = []
            for fraction in fractions:
                rate = max(1.0, round(top * fraction))
                _progress(f"sweep: {rate:g} sagas/s for {args.sweep_duration:g} s")
                results["sweep"].append(
                    await measured_open_loop(
                        env, system, args, watcher, rate=rate, duration=args.sweep_duration
                    )
                )
        if "watchers" in phases:
            results["watchers"] = await _watchers_runs(env, system, args, watcher)
        if phases & {"steps", "context", "peers"}:
            await _growth_runs(env, system, args, watcher, results)


async def _watchers_runs(
    env: Environment, system: System, args: argparse.Namespace, watcher: TerminalWatcher
) -> dict[str, Any]:
    """The closed loop without watchers, then ``--variant-rounds`` times with one
    WatchSaga stream per saga in flight and without again (bench/watchers.py)."""
    one = system.targets[:1]
    runs: list[tuple[bool, tuple[dict[str, Any], dict[str, Any]]]] = []

    async def without() -> None:
        _progress(f"watchers: {args.sagas} sagas without watchers")
        figures = await measured_closed_loop(
            env, system, args, watcher, targets=one, profile=False, label="no watchers"
        )
        runs.append((False, figures))

    await without()
    async with watchers.Watchers(one[0]) as watched:
        for n in range(args.variant_rounds):
            _progress(f"watchers: {args.sagas} sagas, a WatchSaga stream on each saga in flight")
            figures = await measured_closed_loop(
                env,
                system,
                args,
                watcher,
                targets=one,
                profile=args.profile and n == 0,
                label=f"{args.concurrency} watchers",
                on_started=watched.started,
            )
            await watched.drain()
            runs.append((True, figures))
            await without()
    found = watchers.compare(runs, watched, system.coordinators[0].name)
    _progress(
        f"  watchers: coordinator CPU per saga +{found['coordinator_cpu_increase_pct']}%"
        f" ({found['coordinator_cpu_extra_pct_of_core']} % of a core more,"
        f" {found['coordinator_cpu_ms_per_stream']} ms per stream), sagas/s ratio"
        f" {found['sagas_per_s_ratio']}, {found['watchers']['peak_concurrent']} streams"
        " open at most"
    )
    return found


async def _variant_run(
    env: Environment,
    args: argparse.Namespace,
    *,
    prefix: str,
    coordinator_env: Mapping[str, str] | None = None,
    participant_envs: Sequence[Mapping[str, str]] = (),
    ports: Sequence[int] = (),
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    check: Callable[[System], Awaitable[dict[str, Any]]] | None = None,
    coordinators: int = 1,
) -> dict[str, Any]:
    """One run of a variant phase (bench/variants.py): a fresh system (databases named
    with ``prefix``; ``coordinators`` replicas, the load spread over them), its warm-up
    and measured closed loop (:func:`_observed_loop`), then ``check`` on the system still
    running (its figures join the run's), and the system stopped and its databases
    dropped."""
    system = await start_system(
        env,
        args,
        prefix=prefix,
        coordinator_env=coordinator_env,
        participant_envs=participant_envs,
        credentials=credentials,
        token=token,
    )
    processes = [*system.coordinators, *system.participants.values()]
    try:
        for n in range(2, coordinators + 1):
            replica, target = _coordinator(
                env,
                args,
                system.coordinator_url,
                n,
                coordinator_env,
                name=f"{prefix}coordinator-{n}",
            )
            processes.append(replica)
            await _start_coordinator(replica, target, credentials=credentials)
            system.coordinators.append(replica)
            system.targets.append(target)
        figures = await _observed_loop(env, args, system, processes, list(ports))
        if check is not None:
            figures |= await check(system)
    finally:
        await env.stop_processes(processes)
        for role in ("coordinator", *SERVICES):
            with contextlib.suppress(psycopg.Error):
                await env.drop_database(prefix + role)
    # Stopped, so every span was flushed to the processes' files.
    figures["spans"] += figures.pop("_span_files").lines_since()
    return figures


async def _on_against_off(
    args: argparse.Namespace,
    results: dict[str, Any],
    phase: str,
    run: variants.Run,
    *,
    budget: float,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """A phase of two variants, ``off`` and ``on``, in ``--variant-rounds`` alternating
    rounds (:func:`bench.variants.on_against_off`): its result in ``results[phase]``
    (returned, for the phase to add to), and its verdict printed."""
    found = await variants.on_against_off(
        run,
        budget=budget,
        rounds=args.variant_rounds,
        phase=phase,
        progress=_progress,
        labels=labels,
    )
    results[phase] = found
    _verdicts(phase, found)
    return found


def _verdicts(phase: str, found: Mapping[str, Any]) -> None:
    """A progress line per compared variant of a variant phase."""
    for name in found["comparisons"]:
        _progress(f"  {phase}: {variants.verdict_text(found, name)}")


async def observability_phase(
    env: Environment, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """The standard closed loop with metrics off, on (scraped) and tracing on, in
    alternating rounds; see :mod:`bench.observability`."""
    observability.tracing_env(args.tracing_env)  # a bad --tracing-env fails before any run

    async def run(
        name: str,
        n: int,
        coordinator_env: Mapping[str, str],
        participant_envs: Sequence[Mapping[str, str]],
        ports: list[int],
    ) -> dict[str, Any]:
        return await _variant_run(
            env,
            args,
            prefix=f"obs_{name}_r{n}_",
            coordinator_env=coordinator_env,
            participant_envs=participant_envs,
            ports=ports,
        )

    found = await observability.measure(
        run,
        rounds=args.variant_rounds,
        free_port=free_port,
        tracing=args.tracing_env,
        services=len(SERVICES),
        progress=_progress,
        spans=env.workdir,
    )
    results["observability"] = found
    _verdicts("observability", found)


async def _observed_loop(
    env: Environment,
    args: argparse.Namespace,
    system: System,
    processes: list[Child],
    ports: list[int],
) -> dict[str, Any]:
    """Warm-up, then the measured closed loop (scraping ``ports`` meanwhile): its
    figures, the CPU per saga of the system's processes, spans written to their logs."""

    def load() -> Load:
        return Load(
            system.targets,
            fail_rate=args.fail_rate,
            credentials=system.credentials,
            token=system.token,
        )

    async with TerminalWatcher(system.coordinator_url, args.poll_interval) as watcher:
        if args.warmup:
            async with load() as warming:
                await closed_loop(
                    warming,
                    watcher,
                    sagas=args.warmup,
                    concurrency=min(args.concurrency, args.warmup),
                )
            watcher.take_troubles()
        offsets = log_offsets(processes)
        span_files = observability.span_files(processes)
        meter, backends = system_meters(env, args, processes)
        scraper = observability.Scraper(ports, args.scrape_interval)
        await backends.start()
        meter.start()
        async with scraper, load() as measured:
            samples = await closed_loop(
                measured, watcher, sagas=args.observability_sagas, concurrency=args.concurrency
            )
        used = await meter.stop()
        backend_cpu = await backends_cpu(backends)
        env.check_alive(processes)
        figures = analyse(samples)
        figures["disturbed"] = disturbances(processes, offsets) + watcher.take_troubles()
    done = max(1, figures["terminal"])
    cpu = sum(p["cpu_s"] for name, p in used["processes"].items() if name != BROKER)
    figures["cpu_ms_per_saga"] = round(1000 * cpu / done, 3)
    # PostgreSQL's and RabbitMQ's own CPU per saga, for the same work in every variant
    # (bench/variants.py: what the machine's speed did to this run).
    services = sum(backend_cpu.values()) + used["processes"].get(BROKER, {}).get("cpu_s", 0.0)
    figures["services_cpu_ms_per_saga"] = round(1000 * services / done, 3) if services else None
    if ports:
        figures["scraper"] = scraper.figures()
    # Spans of the measured loop printed by the processes (a console exporter); those
    # exported to files are counted once the processes stopped (flushed): _variant_run.
    figures["spans"] = sum(
        line.count('"trace_id"') for p in processes for line in p.output_since(offsets[p.name])
    )
    figures["_span_files"] = span_files
    return figures


EVENTS_BUDGET = 0.15
"""Issue 16: one domain event per step may cost at most this share of sagas/s."""


async def events_phase(env: Environment, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The standard closed loop (``--observability-sagas`` sagas) without and with one
    domain event emitted per step (``bench.participant``'s ``EMIT_EVENTS_ENV``), in
    alternating rounds (bench/variants.py): the median paired sagas/s ratio against the
    15% budget. Nobody subscribes to the events, so the broker drops them after the
    relay's confirmed publish (what every emitter pays)."""

    async def run(name: str, n: int) -> dict[str, Any]:
        emit = {EMIT_EVENTS_ENV: "1" if name == "on" else "0"}
        return await _variant_run(
            env, args, prefix=f"events_{name}_r{n}_", participant_envs=[emit] * len(SERVICES)
        )

    await _on_against_off(
        args,
        results,
        "events",
        run,
        budget=EVENTS_BUDGET,
        labels={"off": "no events", "on": "one event per step"},
    )


async def security_phase(
    env: Environment, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """The standard closed loop with TLS, tokens and signing off and on, in alternating
    rounds (bench/variants.py), against issue 17's 5% budget; every run checked to be
    what its name says (see :mod:`bench.security`)."""
    secured = await security.secure(env.workdir / "security", SERVICES)
    credentials = secured.credentials()

    async def run(name: str, n: int) -> dict[str, Any]:
        on = name == "on"
        prefix = f"sec_{name}_r{n}_"

        async def check(system: System) -> dict[str, Any]:
            return await security.check(
                system.targets[0],
                coordinator_url=system.coordinator_url,
                participant_urls={s: env.db_url(prefix + s) for s in SERVICES},
                credentials=system.credentials,
                token=system.token,
            )

        before = await security.dead_letters(env.amqp_url)
        figures = await _variant_run(
            env,
            args,
            prefix=prefix,
            coordinator_env=secured.coordinator_env() if on else security.OFF_COORDINATOR,
            participant_envs=[
                secured.participant_env(s) if on else security.OFF_PARTICIPANT for s in SERVICES
            ],
            credentials=credentials if on else None,
            token=secured.token if on else None,
            check=check,
        )
        # The dead-letter queue belongs to the vhost, which every phase shares: what this
        # run added.
        figures["dead_letters"] = await security.dead_letters(env.amqp_url) - before
        return figures

    found = await _on_against_off(
        args, results, "security", run, budget=security.BUDGET, labels=security.LABELS
    )
    problems = {
        name: [f"round {n}: {p}" for n, r in enumerate(rs, 1) for p in security.verified(name, r)]
        for name, rs in found["runs"].items()
    }
    # Whether every run was what its name says: else the ratio may compare "off" with itself.
    found["problems"] = {name: listed for name, listed in problems.items() if listed}
    found["verified"] = not any(problems.values())
    for name, found_problems in problems.items():
        for problem in found_problems:
            _progress(f"  security: {name} NOT AS NAMED: {problem}")


REPLICAS_BUDGET = 0.05
"""Issue 21: two coordinators give at least 95% of one's sagas/s."""


async def scaling_phase(
    env: Environment, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """The standard closed loop against one coordinator and against two on the same
    database (the load spread over both by the client), in alternating rounds
    (bench/variants.py), against issue 21's 5% budget."""

    async def run(name: str, n: int) -> dict[str, Any]:
        return await _variant_run(
            env, args, prefix=f"scale_{name}_r{n}_", coordinators=2 if name == "on" else 1
        )

    await _on_against_off(
        args,
        results,
        "scaling",
        run,
        budget=REPLICAS_BUDGET,
        labels={"off": "1 coordinator", "on": "2 coordinators"},
    )


async def starts_phase(env: Environment, args: argparse.Namespace, results: dict[str, Any]) -> None:
    url = await env.create_database("starts")
    coordinator, target = _coordinator(env, args, url, 8)
    coordinator.name = "coordinator-starts"
    try:
        await _start_coordinator(coordinator, target)
        _progress(
            f"starts: {args.start_sagas} sagas by StartSaga ({args.concurrency} in flight), "
            f"then by StartSagas in chunks of {args.start_chunk}"
        )
        offsets = log_offsets([coordinator])
        figures = await starts.measure(
            target=target,
            coordinator=coordinator,
            database_url=url,
            admin_url=args.database_url,
            database=env.db_name("starts"),
            amqp_url=env.amqp_url,
            sagas=args.start_sagas,
            chunk=args.start_chunk,
            concurrency=args.concurrency,
        )
        env.check_alive([coordinator])
        figures["disturbed"] = disturbances([coordinator], offsets)
        results["starts"] = figures
        single, batch, ratios_ = figures["single"], figures["batch"], figures["ratio"]
        _progress(
            f"  StartSaga {single['sagas_per_s']} sagas/s, "
            f"{single['coordinator_cpu_ms_per_saga']} ms CPU per saga; StartSagas "
            f"{batch['sagas_per_s']} sagas/s, {batch['coordinator_cpu_ms_per_saga']} ms; "
            f"CPU ratio {ratios_['coordinator_cpu_ms_per_saga']}"
        )
    finally:
        await env.stop_processes([coordinator])
    await env.drop_database("starts")


async def stored_phase(env: Environment, args: argparse.Namespace, results: dict[str, Any]) -> None:
    url = await env.create_database("stored")
    coordinator, target = _coordinator(env, args, url, 9)
    coordinator.name = "coordinator-stored"
    try:
        await _start_coordinator(coordinator, target)
        await _stored_reads(env, args, results, url, coordinator, target)
    finally:
        await env.stop_processes([coordinator])
    await env.drop_database("stored")


async def _stored_reads(
    env: Environment,
    args: argparse.Namespace,
    results: dict[str, Any],
    url: str,
    coordinator: Child,
    target: str,
) -> None:
    have = 0
    results["stored"] = []
    for want in sorted(int(x) for x in str(args.stored).split(",") if x.strip()):
        _progress(f"stored sagas: generating {want:,} ...")
        offsets = log_offsets([coordinator])
        grown = await stored.grow(url, have=have, want=want, active=args.active)
        have = want
        reads = await stored.time_reads(
            target, stored=want, get_calls=args.get_calls, list_calls=args.list_calls
        )
        env.check_alive([coordinator])
        entry = {
            "stored": want,
            "grow": grown,
            **reads,
            "coordinator_rss_mb": round(rss_mb(coordinator.pid), 1),
            "coordinator_peak_rss_mb": peak_rss_mb(coordinator.pid),
            "disturbed": disturbances([coordinator], offsets),
        }
        results["stored"].append(entry)
        _progress(
            f"  {want:,} stored: GetSaga p99 {reads['get_saga_ms']['p99']} ms, ListActive p99 "
            f"{reads['list_active_first_page_ms']['p99']} ms, ListSagas p99 "
            f"{reads['list_sagas_first_page_ms']['p99']} ms"
        )


# -- issue 21: the peer (--phases peers) and cost as the work grows (steps, context, waiting)


async def _metered_open_loop(
    env: Environment,
    system: System,
    args: argparse.Namespace,
    watcher: TerminalWatcher,
    *,
    rate: float,
    duration: float,
    shape: str = "standard",
    context_bytes: int = CONTEXT_BYTES,
) -> dict[str, Any]:
    """An open loop below capacity with the CPU of the whole system under test (its
    processes, their PostgreSQL backends, the broker counted whole) per saga and per step."""
    processes = [*system.coordinators, *system.participants.values()]
    meter, backends = system_meters(env, args, processes)
    offsets = log_offsets(processes)
    await backends.start()
    meter.start()
    async with Load(
        system.targets[:1], fail_rate=args.fail_rate, shape=shape, context_bytes=context_bytes
    ) as load:
        # Long sagas take long below capacity too: a 100-step saga is 100 steps deep.
        samples = await open_loop(
            load, watcher, rate=rate, duration=duration, drain_timeout=max(60, args.drain_timeout)
        )
    used = await meter.stop()
    backend_cpu = await backends_cpu(backends)
    ids = [s.saga_id for s in samples if s.saga_id]
    executed = (await database_counts(system.coordinator_url, ids))["steps_executed"]
    env.check_alive(processes)
    steps = steps_in(shape)
    figures = analyse(samples, steps_per_saga=steps)
    figures["disturbed"] = disturbances(processes, offsets) + watcher.take_troubles()
    cpu = {name: p["cpu_s"] for name, p in used["processes"].items()}
    cpu |= {f"postgres: {db.removeprefix(env.prefix + '_')}": s for db, s in backend_cpu.items()}
    figures.update(growth.per_work(cpu, steps_executed=executed, steps=steps))
    figures |= {"rate": rate, "duration_s": duration, "shape": shape, "steps": steps}
    figures["context_bytes"] = context_bytes
    figures["p50_ms_per_step"] = growth.per_step(figures)
    _progress(
        f"  {shape}, {context_bytes:,} B context, {rate:g}/s: {figures['cpu_ms_per_saga']} ms CPU"
        f" per saga ({figures['cpu_ms_per_step']} per step), p50"
        f" {figures['start_to_terminal_ms']['p50']} ms ({figures['p50_ms_per_step']} per step)"
    )
    return figures


async def _growth_runs(
    env: Environment,
    system: System,
    args: argparse.Namespace,
    watcher: TerminalWatcher,
    results: dict[str, Any],
) -> None:
    """The steps and context phases, on the running standard system."""
    if "steps" in args.phase_set:
        runs = []
        for n in growth.counts(args.steps):
            # The same steps/s offered whatever the saga's length: below capacity, and the
            # background CPU (timer loop, relay) then weighs the same on every step.
            rate = args.steps_rate / n
            _progress(f"steps: {n}-step sagas, {rate:g}/s for {args.steps_duration:g} s")
            runs.append(
                await _metered_open_loop(
                    env,
                    system,
                    args,
                    watcher,
                    rate=rate,
                    duration=args.steps_duration,
                    shape="standard" if n == 3 else f"line{n}",
                )
            )
        results["steps"] = {"runs": runs, **growth.steps_ratios(runs)}
        _progress(f"  steps: CPU per step ratios {results['steps']['cpu_per_step_ratio']}")
    if "context" in args.phase_set:
        runs = []
        for size in growth.counts(args.context_sizes):
            _progress(
                f"context: {size:,} B contexts, {args.context_rate:g}/s for "
                f"{args.context_duration:g} s"
            )
            runs.append(
                await _metered_open_loop(
                    env,
                    system,
                    args,
                    watcher,
                    rate=args.context_rate,
                    duration=args.context_duration,
                    context_bytes=size,
                )
            )
        results["context"] = {"runs": runs, **growth.context_ratios(runs)}
        _progress(f"  context: CPU per saga ratio {results['context']['cpu_per_saga_ratio']}")
    if "peers" in args.phase_set:
        await _peer_sagaplane_runs(env, system, args, watcher, results)


async def _peer_sagaplane_runs(
    env: Environment,
    system: System,
    args: argparse.Namespace,
    watcher: TerminalWatcher,
    results: dict[str, Any],
) -> None:
    """Sagaplane's side of the peers phase: the throughput run's figures (or a closed loop
    of its own), and a latency run at ``--peer-rate`` (the latency phase's if it ran at
    that rate)."""
    mine: dict[str, Any] = {}
    if "throughput" in results:
        mine["throughput"] = dict(results["throughput"])
        used = results.get("resources", {})
        mine["throughput"]["from"] = "the throughput phase"
    else:
        _progress(f"peers: Sagaplane, {args.peer_sagas} sagas, {args.concurrency} in flight")
        saved = args.sagas
        args.sagas = args.peer_sagas
        try:
            figures, used = await measured_closed_loop(
                env,
                system,
                args,
                watcher,
                targets=system.targets[:1],
                profile=False,
                label="peers: Sagaplane",
            )
        finally:
            args.sagas = saved
        mine["throughput"] = {**figures, "from": "the peers phase's own closed loop"}
    mine["throughput"]["cpu_ms_per_saga"] = used.get("total_cpu_ms_per_saga")
    latency = results.get("latency")
    if latency and latency["rate"] == args.peer_rate:
        mine["latency"] = {**latency, "from": "the latency phase"}
    else:
        _progress(f"peers: Sagaplane at {args.peer_rate:g} sagas/s for {args.peer_duration:g} s")
        figures = await measured_open_loop(
            env, system, args, watcher, rate=args.peer_rate, duration=args.peer_duration
        )
        mine["latency"] = {**figures, "from": "the peers phase's own open loop"}
    results["peers"] = {"sagaplane": mine}


async def peers_phase(env: Environment, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """DBOS Transact on fresh databases, in a process of its own (:mod:`bench.peer_dbos`),
    compared with Sagaplane's figures of this run (:mod:`bench.peers`)."""
    mine = results.get("peers", {}).get("sagaplane")
    if mine is None:
        raise RuntimeError("Sagaplane's side of the peers phase did not run (see above)")
    system_url = await env.create_database("peer_dbos_system")
    app_url = await env.create_database("peer_dbos_app")
    out = env.workdir / "peer-dbos.json"
    concurrency = args.peer_concurrency or args.concurrency
    _progress(
        f"peers: DBOS Transact, {args.peer_workflows} workflows, {concurrency} in flight, then"
        f" {args.peer_one_at_a_time} one at a time"
    )
    child = env.python(
        "bench.peer_dbos",
        "--system-database-url",
        system_url,
        "--app-database-url",
        app_url,
        "--admin-url",
        args.database_url,
        "--out",
        str(out),
        "--workflows",
        str(args.peer_workflows),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(min(args.warmup, args.peer_workflows)),
        "--one-at-a-time",
        str(args.peer_one_at_a_time),
        "--pool-size",
        str(args.peer_pool_size),
        name="peer-dbos",
    )
    try:
        await child.start()
        assert child.proc is not None
        code = await child.proc.wait()
        if code != 0 or not out.exists():
            raise RuntimeError(f"bench.peer_dbos exited {code}:\n{child.tail(30)}")
    finally:
        await env.stop_processes([child])
        for role in ("peer_dbos_system", "peer_dbos_app"):
            with contextlib.suppress(psycopg.Error):
                await env.drop_database(role)
    dbos = peers.load(out)
    results["peers"] |= {"dbos": dbos, **peers.compare(mine, dbos)}
    p = results["peers"]
    _progress(
        f"  DBOS {dbos['closed_loop']['workflows_per_s']} workflows/s, one at a time p50"
        f" {dbos['one_at_a_time_ms']['p50']} ms; Sagaplane/DBOS throughput"
        f" {p['throughput_ratio']}, p50 {p['p50_ratio']}"
    )


async def waiting_phase(
    env: Environment, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """Sagas in flight waiting on a stopped participant (:mod:`bench.growth`), on a
    system of its own."""
    prefix = "wait_"
    # Metrics on, for the timer loop's rounds (sagaplane_timer_round_seconds); on for
    # the reference closed loop too, so that the drain's ratio compares like with like.
    metrics_port = free_port()
    system = await start_system(
        env,
        args,
        prefix=prefix,
        coordinator_env={"SAGAPLANE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
    )
    processes = [*system.coordinators, *system.participants.values()]
    offsets = log_offsets(processes)
    try:
        async with TerminalWatcher(system.coordinator_url, args.poll_interval) as watcher:
            _progress(
                f"waiting: reference closed loop, {args.waiting_reference} sagas, "
                f"{args.concurrency} in flight"
            )
            async with Load(system.targets) as load:
                samples = await closed_loop(
                    load, watcher, sagas=args.waiting_reference, concurrency=args.concurrency
                )
            reference = analyse(samples)
        stopped = system.participants[growth.STOPPED]
        figures = await growth.waiting(
            target=system.targets[0],
            coordinator=system.coordinators[0],
            stopped=stopped,
            database_url=system.coordinator_url,
            sagas=args.waiting_sagas,
            idle_seconds=args.waiting_idle,
            calls=args.waiting_calls,
            restart=lambda: _restart_participant(env, stopped),
            progress=_progress,
            metrics_port=metrics_port,
        )
        env.check_alive(processes)
        figures["disturbed"] = disturbances(processes, offsets)
        throughput = results.get("throughput", {}).get("sagas_per_s")
        figures |= growth.waiting_ratios(figures, reference["sagas_per_s"], throughput)
        figures["reference"] = reference
        results["waiting"] = figures
        _progress(
            f"  waiting: coordinator idle {figures['idle']['coordinator_cpu_pct_of_core']}% of a"
            f" core; StartSaga p99 x{figures['start_saga_p99_ratio']}, GetSaga p99"
            f" x{figures['get_saga_p99_ratio']}; drained at {figures['drain']['sagas_per_s']}/s"
            f" = {figures['drain_vs_reference']} of {reference['sagas_per_s']}/s"
        )
    finally:
        await env.stop_processes(processes)
        for role in ("coordinator", *SERVICES):
            with contextlib.suppress(psycopg.Error):
                await env.drop_database(prefix + role)


async def _restart_participant(env: Environment, participant: Child) -> None:
    await participant.start()
    await _wait_consuming(env, {participant.name.rsplit("-", 1)[-1]: participant})


def ratios(results: dict[str, Any]) -> None:
    t = results.get("throughput")
    if not t:
        return
    wall = t["wall_s"]
    db = t["db"]
    transitions = (t["sagas"] - t["errors"]) + db["steps_executed"]
    r: dict[str, Any] = {
        "transitions_per_s": round(transitions / wall, 1),
        "history_rows_per_s": round(db["history_rows"] / wall, 1),
        "messages_per_s": round(2 * db["commands"] / wall, 1),
    }
    base = results.get("baselines", {})
    if "pgbench" in base:
        r["transitions_vs_pgbench"] = round(r["transitions_per_s"] / base["pgbench"]["tps"], 3)
    if "broker" in base:
        r["messages_vs_broker"] = round(r["messages_per_s"] / base["broker"]["messages_per_s"], 3)
    t["ratios"] = r


def targets(results: dict[str, Any]) -> None:
    """The issues' targets, each met or not; "valid" is False when the run it comes from
    was disturbed (the broker or the database went away under it)."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool, run: dict[str, Any] | None) -> None:
        valid = not (run or {}).get("disturbed")
        out.append({"target": target, "measured": measured, "met": met, "valid": valid})

    t = results.get("throughput")
    if t:
        add(">= 400 sagas/s sustained", f"{t['sagas_per_s']}/s", t["sagas_per_s"] >= 400, t)
        add(">= 1,200 steps/s", f"{t['steps_per_s']}/s", t["steps_per_s"] >= 1200, t)
        add("zero failed sagas", f"{t['not_completed']} not completed", t["not_completed"] == 0, t)
    lat = results.get("latency")
    if lat:
        p50, p99 = lat["start_to_terminal_ms"]["p50"], lat["start_to_terminal_ms"]["p99"]
        add(f"at {lat['rate']:g}/s: p50 <= 15 ms", f"{p50} ms", p50 is not None and p50 <= 15, lat)
        add(f"at {lat['rate']:g}/s: p99 <= 50 ms", f"{p99} ms", p99 is not None and p99 <= 50, lat)
    watching = results.get("watchers")
    if watching:
        extra = watching["coordinator_cpu_extra_pct_of_core"]
        increase = watching["coordinator_cpu_increase_pct"]
        add(
            f"{watching['watchers']['peak_concurrent']} concurrent watchers cost the coordinator"
            " < 5% CPU",
            f"+{increase}% CPU per saga ({extra:+}% of a core)",
            increase < 5,
            {"disturbed": [d for r in watching["runs"] for d in r["disturbed"]]},
        )
    starting = results.get("starts")
    if starting:
        cpu_ratio = starting["ratio"]["coordinator_cpu_ms_per_saga"]
        add(
            "StartSagas: coordinator CPU per saga well under half of StartSaga's (< 0.5)",
            f"ratio {cpu_ratio}",
            cpu_ratio is not None and cpu_ratio < 0.5,
            starting,
        )
    st = results.get("stored", [])
    if len(st) >= 2:
        lo, hi = st[0], st[-1]
        both = {"disturbed": lo["disturbed"] + hi["disturbed"]}
        for key, name in (
            ("get_saga_ms", "GetSaga"),
            ("get_saga_recent_ms", "GetSaga (newest 10k)"),
            ("list_active_first_page_ms", "ListActive"),
            ("list_sagas_first_page_ms", "ListSagas (by state and name)"),
        ):
            a, b = lo[key]["p99"], hi[key]["p99"]
            add(
                f"{name} p99 at {hi['stored']:,} vs {lo['stored']:,} (<= 1.5x)",
                f"{a} -> {b} ms",
                b <= 1.5 * a,
                both,
            )
        a, b = lo["coordinator_rss_mb"], hi["coordinator_rss_mb"]
        add(
            "coordinator RSS does not grow with sagas stored (<= +10%)",
            f"{a} -> {b} MiB",
            b <= 1.1 * a,
            both,
        )
    o = results.get("observability")
    if o:
        for name, met in o["within_budget"].items():
            budget = observability.BUDGETS[name]
            add(
                f"{name} on costs at most {100 * budget:.0f}% of sagas/s against metrics off",
                _variant_measured(o, name),
                met,
                _variant_disturbed(o, name),
            )
    ev = results.get("events")
    if ev and ev.get("ratio") is not None:
        add(
            f"one domain event per step costs <= {100 * EVENTS_BUDGET:.0f}% of sagas/s (issue 16)",
            _variant_measured(ev, "on"),
            ev["within_budget"],
            _variant_disturbed(ev, "on"),
        )
    sc = results.get("scaling")
    if sc and sc.get("ratio") is not None:
        add(
            f"two coordinators >= {1 - REPLICAS_BUDGET:.2f}x the sagas/s of one (issue 21)",
            _variant_measured(sc, "on"),
            sc["within_budget"],
            _variant_disturbed(sc, "on"),
        )
    sec = results.get("security")
    if sec and sec.get("ratio") is not None:
        measured = _variant_measured(sec, "on")
        if not sec["verified"]:
            measured += "; NOT AS NAMED: " + "; ".join(
                p for found in sec["problems"].values() for p in found
            )
        add(
            f"TLS, tokens and signing on cost <= {100 * security.BUDGET:.0f}% of sagas/s"
            " (issue 17)",
            measured,
            sec["within_budget"] and sec["verified"],
            _variant_disturbed(sec, "on"),
        )
    p = results.get("peers")
    if p and "dbos" in p:
        tp = p["sagaplane"]["throughput"]
        lat = p["sagaplane"]["latency"]
        closed, single = p["dbos"]["closed_loop"], p["dbos"]["one_at_a_time_ms"]
        add(
            f"Throughput >= {peers.TARGET_THROUGHPUT_RATIO:g}x DBOS closed-loop workflows/s",
            f"{tp['sagas_per_s']}/s against {closed['workflows_per_s']}/s"
            f" (x{p['throughput_ratio']})",
            p["throughput_target_met"],
            tp,
        )
        add(
            f"at {lat['rate']:g} sagas/s p50 <= DBOS's one-at-a-time p50",
            f"{lat['start_to_terminal_ms']['p50']} against {single['p50']} ms",
            p["p50_target_met"],
            lat,
        )
    for target, measured, met, run in growth.targets(results):
        add(target, measured, met, run)
    results["targets"] = out


def _variant_measured(found: Mapping[str, Any], name: str) -> str:
    """A variant phase's figure in the Targets table: the judged median of paired ratios,
    with the rounds, the medians of sagas/s and the CPU per saga's increase."""
    c = found["comparisons"][name]
    base = found["variants"][found["baseline"]]["sagas_per_s"]
    cpu = c["cpu_increase_pct"]
    return (
        f"median paired ratio {c['paired_median']} over {found['rounds']} round(s) (medians"
        f" {base} -> {found['variants'][name]['sagas_per_s']}/s); CPU per saga"
        f" {'-' if cpu is None else f'{cpu:+.1f}%'}"
    )


def _variant_disturbed(found: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The disturbances of a variant's and the baseline's runs, for :func:`targets`."""
    summaries = found["variants"]
    return {"disturbed": summaries[name]["disturbed"] + summaries[found["baseline"]]["disturbed"]}


async def _versions(args: argparse.Namespace) -> dict[str, str]:
    found: dict[str, str] = {}
    with contextlib.suppress(Exception):
        async with await psycopg.AsyncConnection.connect(args.database_url) as c:
            row = await (await c.execute("SHOW server_version")).fetchone()
            found["postgres"] = str(row[0]) if row else "?"
            rows = await (
                await c.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (["fsync", "synchronous_commit", "shared_buffers"],),
                )
            ).fetchall()
            found["postgres_settings"] = ", ".join(f"{n}={v}" for n, v in rows)
    with contextlib.suppress(Exception):
        found["rabbitmq"] = (await rabbitmqctl("version")).strip()
    with contextlib.suppress(Exception):
        # git itself: in a worktree (or with packed refs) .git/HEAD does not lead to the commit.
        commit = await run_command("git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD")
        found["commit"] = commit.strip()
    return found


async def run(args: argparse.Namespace) -> int:
    started = datetime.now(UTC)
    mode = "quick" if args.quick else "default"
    stem = f"{started:%Y%m%dT%H%M%SZ}-{mode}"
    if args.phase_set != set(PHASES):
        stem += "-" + "+".join(p for p in PHASES if p in args.phase_set)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / stem
    workdir.mkdir(parents=True, exist_ok=True)
    env = Environment(args.database_url, args.amqp_url, workdir, keep=args.keep)
    results: dict[str, Any] = {
        "meta": {
            "mode": mode,
            "started_at": started.isoformat(timespec="seconds"),
            "run_id": env.run_id,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "argv": sys.argv[1:],
            "options": {
                k: (str(v) if isinstance(v, Path | set) else v) for k, v in vars(args).items()
            },
            **await _versions(args),
        }
    }
    if os.getloadavg()[0] > 0.5:
        results["meta"]["note"] = (
            f"the machine was not quiet (load average {os.getloadavg()[0]:.2f} at start): "
            "figures are noisy"
        )
    t0 = time.monotonic()
    global _T0
    _T0 = t0
    errors: list[str] = []

    async def phase(name: str, work: Callable[[], Awaitable[object]]) -> bool:
        """Run one phase; a failure is recorded and the run goes on with the next one."""
        try:
            await wait_for_services(args.database_url, args.amqp_url)
            await work()
            return True
        except Exception as exc:  # any failure ends this phase, not the run
            message = f"{name}: {type(exc).__name__}: {str(exc).strip()}"
            errors.append(message)
            print(f"error: {message}\n(logs: {workdir})", file=sys.stderr)
            return False

    async def run_baselines() -> None:
        _progress("baselines: pgbench ...")
        pg = await baselines.pgbench(
            env,
            clients=args.pgbench_clients,
            seconds=args.pgbench_seconds,
            single_client_seconds=args.pgbench_seconds / 2,
        )
        results["baselines"] = {"pgbench": pg}
        _progress("baselines: broker ...")
        results["baselines"]["broker"] = await baselines.broker(env, count=args.broker_messages)
        _progress("baselines: one message at a time through the broker ...")
        results["baselines"]["broker_hop"] = await baselines.broker_hop(
            env, count=args.hop_messages
        )
        results["baselines"]["latency_floor"] = baselines.latency_floor(results["baselines"])

    try:
        if await phase("setup", env.create_vhost):
            if "baselines" in args.phase_set:
                await phase("baselines", run_baselines)
            system_set = {"throughput", "latency", "fanout", "sweep", "watchers"}
            if args.phase_set & (system_set | {"steps", "context", "peers"}):
                await phase("system", lambda: system_phases(env, args, results))
            if "peers" in args.phase_set:
                await phase("peers", lambda: peers_phase(env, args, results))
            if "waiting" in args.phase_set:
                await phase("waiting", lambda: waiting_phase(env, args, results))
            if "starts" in args.phase_set:
                await phase("starts", lambda: starts_phase(env, args, results))
            if "stored" in args.phase_set:
                await phase("stored", lambda: stored_phase(env, args, results))
            if "observability" in args.phase_set:
                await phase("observability", lambda: observability_phase(env, args, results))
            if "events" in args.phase_set:
                await phase("events", lambda: events_phase(env, args, results))
            if "security" in args.phase_set:
                await phase("security", lambda: security_phase(env, args, results))
            if "scaling" in args.phase_set:
                await phase("scaling", lambda: scaling_phase(env, args, results))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(env.close())
    results["errors"] = errors
    results["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    results["meta"]["progress"] = PROGRESS
    ratios(results)
    targets(results)
    print(report.render(results))
    json_path = args.out / f"{stem}.json"
    report.write_json(results, json_path)
    print(f"JSON: {json_path}")
    if not args.no_plot:
        png = args.out / f"{stem}.png"
        if report.plot(results, png):
            print(f"plot: {png}")
        else:
            print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"logs: {workdir}")
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    args = parse(argv)

    async def guarded() -> int:
        if args.clean_stale:
            for removed in await clean_stale(args.database_url):
                print(f"removed {removed}")
            return 0
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # SIGTERM cancels the run like Ctrl-C does, so the cleanup still happens.
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    try:
        code = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaned up", file=sys.stderr)
        code = 130
    sys.exit(code)
