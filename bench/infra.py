"""The environment of one benchmark run: fresh databases, a fresh RabbitMQ vhost, and the
processes under test (coordinators, participants), with their CPU and memory accounted.

Everything created here is removed by :meth:`Environment.close` (unless asked to keep it).
The processes, databases and vhost themselves are :mod:`sagaplane.testing`'s (the demo and
the tests use the same); what is here is the benchmark's own: names per run, retries while
a shared machine's services restart, and the accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg

from sagaplane.testing import (
    Child,
    RabbitmqctlFailed,
    create_database,
    create_vhost,
    delete_vhost,
    drop_database,
    rabbitmqctl,
    with_database,
    with_vhost,
)

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: processes under test run from here."""

SERVICES = ("orders", "inventory", "payment")
"""The three participant services of the standard workload."""


async def run_command(*argv: str, within: float = 60.0) -> str:
    """Run a command (pgbench, git) to completion; its stdout, or RuntimeError with its
    output. RabbitMQ's commands go through :func:`sagaplane.testing.rabbitmqctl`."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(within):
        out, _ = await proc.communicate()
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {text.strip()}")
    return text


async def wait_for_services(admin_url: str, amqp_url: str, within: float = 180.0) -> None:
    """Wait until PostgreSQL and RabbitMQ accept connections (on a shared machine, other
    test suites restart them on purpose); RuntimeError after ``within`` seconds."""
    import aio_pika

    deadline = time.monotonic() + within
    said = False
    while True:
        problem = ""
        try:
            async with await psycopg.AsyncConnection.connect(admin_url, connect_timeout=5):
                pass
        except psycopg.Error as exc:
            problem = f"PostgreSQL: {exc}"
        if not problem:
            try:
                connection = await aio_pika.connect(amqp_url, timeout=5)
                await connection.close()
            except Exception as exc:
                problem = f"RabbitMQ: {exc}"
        if not problem:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not available after {within:.0f}s: {problem}")
        if not said:
            print(f"waiting for the services ({problem}) ...", file=sys.stderr, flush=True)
            said = True
        await asyncio.sleep(2)


async def clean_stale(admin_url: str) -> list[str]:
    """Drop the databases and vhosts that crashed benchmark runs left behind (those that
    nobody is connected to); returns what was removed."""
    removed: list[str] = []
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as c:
        cur = await c.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'sagaplane\\_bench\\_%' "
            "AND datname NOT IN (SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)"
        )
        stale = [str(name) for (name,) in await cur.fetchall()]
    for name in stale:
        await drop_database(with_database(admin_url, name))
        removed.append(f"database {name}")
    vhosts = (await rabbitmqctl("list_vhosts", "name")).split()
    busy = set((await rabbitmqctl("list_connections", "vhost")).split())
    for vhost in vhosts:
        if vhost.startswith("sagaplane-bench-") and vhost not in busy:
            await delete_vhost(vhost)
            removed.append(f"vhost {vhost}")
    return removed


# -- resource accounting -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by the process so far (0 if it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of the process: its name and user + system CPU seconds so far."""
    found: dict[int, tuple[str, float]] = {}
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return found
    for t in threads:
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            name = "?"
        found[t.id] = (name, float(t.user_time + t.system_time))
    return found


def reset_peak_rss(pid: int) -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of the process, where Linux allows it."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MiB, where /proc tells it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float:
    """The process's current resident set in MiB (0 if it is gone)."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


def broker_pid() -> int | None:
    """The RabbitMQ server's Erlang VM on this machine (the largest, if several)."""
    found: list[tuple[int, int]] = []
    for p in psutil.process_iter(["name", "memory_info"]):
        if (p.info.get("name") or "").startswith("beam") and p.info.get("memory_info"):
            found.append((p.info["memory_info"].rss, p.pid))
    return max(found)[1] if found else None


@dataclass
class Meter:
    """CPU used by a set of processes between :meth:`start` and :meth:`stop`, and their
    peak RSS over that span."""

    pids: dict[str, int]
    _cpu0: dict[str, float] = field(default_factory=dict)
    _threads0: dict[str, dict[int, tuple[str, float]]] = field(default_factory=dict)
    _wall0: float = 0.0
    _machine0: Any = None
    _sampled: dict[str, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wall0 = time.monotonic()
        self._machine0 = psutil.cpu_times()
        for name, pid in self.pids.items():
            self._cpu0[name] = cpu_seconds(pid)
            self._threads0[name] = thread_cpu(pid)
            reset_peak_rss(pid)
            self._sampled[name] = rss_mb(pid)
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        # A fallback for systems without VmHWM, and a check on it where it exists.
        while True:
            await asyncio.sleep(0.25)
            for name, pid in self.pids.items():
                self._sampled[name] = max(self._sampled[name], rss_mb(pid))

    async def stop(self) -> dict[str, Any]:
        """Per process: cpu_s and peak_rss_mb; plus the wall time and the machine's load."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        wall = time.monotonic() - self._wall0
        machine1 = psutil.cpu_times()
        busy0 = _busy(self._machine0)
        busy1 = _busy(machine1)
        total = sum(machine1) - sum(self._machine0)
        processes: dict[str, dict[str, Any]] = {}
        for name, pid in self.pids.items():
            peak = peak_rss_mb(pid)
            before = self._threads0[name]
            threads: dict[str, float] = {}
            for tid, (tname, cpu) in thread_cpu(pid).items():
                label = "main" if tid == pid else tname
                used = cpu - before.get(tid, (tname, 0.0))[1]
                threads[label] = round(threads.get(label, 0.0) + used, 3)
            processes[name] = {
                "cpu_s": round(cpu_seconds(pid) - self._cpu0[name], 3),
                "peak_rss_mb": round(max(peak or 0.0, self._sampled[name]), 1),
                "threads_cpu_s": dict(sorted(threads.items(), key=lambda kv: -kv[1])[:4]),
            }
        return {
            "wall_s": round(wall, 3),
            "machine_busy_cpu_s": round(busy1 - busy0, 3),
            "machine_busy_pct": round(100 * (busy1 - busy0) / total, 1) if total else 0.0,
            "processes": processes,
        }


def _busy(t: Any) -> float:
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


WATCHER_APPLICATION = "sagaplane-bench-watcher"
"""application_name of the harness's own polling connection, counted apart."""


@dataclass
class BackendMeter:
    """CPU used by the PostgreSQL backends serving some databases, per database, with the
    harness's own polling connection apart (pids are read from ``pg_stat_activity`` at
    both ends; a backend that ended in between is missed)."""

    admin_url: str
    databases: list[str]
    _cpu0: dict[int, float] = field(default_factory=dict)

    async def _backends(self) -> list[tuple[int, str]]:
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as c:
            cur = await c.execute(
                "SELECT pid, datname, application_name FROM pg_stat_activity "
                "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                (self.databases,),
            )
            rows = await cur.fetchall()
        return [
            (int(pid), "harness poll" if app == WATCHER_APPLICATION else str(db))
            for pid, db, app in rows
        ]

    async def start(self) -> None:
        self._cpu0 = {pid: cpu_seconds(pid) for pid, _ in await self._backends()}

    async def stop(self) -> dict[str, float]:
        """CPU seconds of those backends since :meth:`start`, by database."""
        totals: dict[str, float] = {}
        for pid, label in await self._backends():
            used = cpu_seconds(pid) - self._cpu0.get(pid, 0.0)
            totals[label] = round(totals.get(label, 0.0) + used, 3)
        return totals


# -- processes under test ---------------------------------------------------------------------


DISTURBANCE = re.compile(
    r"CONNECTION_FORCED|Reconnecting|Connect call failed|database unavailable|"
    r"terminating connection|server closed the connection|connection is lost|"
    r"could not (settle|ack)|ConnectionClosed"
)
"""Log lines that mean a service (broker or database) went away under a process."""


def log_offsets(processes: Iterable[Child]) -> dict[str, int]:
    """Where each process's output ends now (see :func:`disturbances`)."""
    return {p.name: p.output_mark() for p in processes}


def disturbances(processes: Iterable[Child], since: Mapping[str, int]) -> list[str]:
    """Log lines written since ``since`` that say the broker or the database went away
    (other test suites on a shared machine restart them): a run with any is not valid."""
    found: list[str] = []
    for p in processes:
        hits = [line for line in p.output_since(since.get(p.name, 0)) if DISTURBANCE.search(line)]
        if hits:
            found.append(f"{p.name}: {len(hits)} lines like: {hits[0][:200]}")
    return found


@dataclass
class Environment:
    """Fresh databases and vhost for one run, and the processes started in them."""

    admin_url: str
    amqp_base_url: str
    workdir: Path
    keep: bool = False
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    databases: list[str] = field(default_factory=list)
    vhost: str | None = None
    processes: list[Child] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"sagaplane_bench_{self.run_id}"

    def db_name(self, role: str) -> str:
        return f"{self.prefix}_{role}"

    def db_url(self, role: str) -> str:
        return with_database(self.admin_url, self.db_name(role))

    @property
    def amqp_url(self) -> str:
        assert self.vhost is not None, "create_vhost() first"
        return with_vhost(self.amqp_base_url, self.vhost)

    async def create_database(self, role: str) -> str:
        """Create a fresh database for ``role`` (replacing a leftover); returns its URL."""
        url = self.db_url(role)
        await create_database(url, replace=True)
        self.databases.append(self.db_name(role))
        return url

    async def drop_database(self, role: str) -> None:
        await drop_database(self.db_url(role))
        name = self.db_name(role)
        if name in self.databases:
            self.databases.remove(name)

    async def create_vhost(self) -> str:
        """Create a fresh vhost that the AMQP URL's user may use; returns the AMQP URL."""
        vhost = f"sagaplane-bench-{self.run_id}"
        await create_vhost(vhost, urlsplit(self.amqp_base_url).username or "guest")
        self.vhost = vhost
        return self.amqp_url

    def python(
        self, module: str, *args: str, env: Mapping[str, str] | None = None, name: str | None = None
    ) -> Child:
        """A (not yet started) ``python -m module args`` of this interpreter, run from
        the repository root in a session of its own, its output in the run's folder."""
        label = name or module
        process = Child(
            label,
            [sys.executable, "-m", module, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=ROOT,
            log_path=self.workdir / f"{label}.log",
            new_session=True,
        )
        self.processes.append(process)
        return process

    def check_alive(self, processes: Iterable[Child]) -> None:
        """Raise :class:`sagaplane.testing.ChildExited` if any of them has exited."""
        for p in processes:
            p.check_alive()

    async def stop_processes(self, processes: Iterable[Child] | None = None) -> None:
        chosen = list(self.processes if processes is None else processes)
        await asyncio.gather(*(p.stop() for p in chosen), return_exceptions=True)
        for p in chosen:
            if p in self.processes:
                self.processes.remove(p)

    async def close(self) -> None:
        """Stop every process, drop every database, delete the vhost (unless ``keep``)."""
        await self.stop_processes()
        if self.keep:
            print(f"kept: databases {', '.join(self.databases)}; vhost {self.vhost}")
            return
        for name in list(self.databases):
            # Retried: PostgreSQL may be restarting (other test suites restart it on purpose).
            for attempt in range(20):
                try:
                    await drop_database(with_database(self.admin_url, name))
                    self.databases.remove(name)
                    break
                except psycopg.Error as exc:
                    if attempt == 19:
                        print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
                    await asyncio.sleep(3)
        if self.vhost is not None:
            # Retried: the broker may be restarting (other test suites stop it on purpose).
            for attempt in range(20):
                try:
                    await delete_vhost(self.vhost)
                    break
                except RabbitmqctlFailed as exc:
                    if attempt == 19:
                        print(
                            f"warning: could not delete vhost {self.vhost}: "
                            f"{str(exc).splitlines()[0]}",
                            file=sys.stderr,
                        )
                    await asyncio.sleep(3)
            self.vhost = None
