"""``sagaplane demo``: the demo shop, end to end, with real processes.

A plain ``sagaplane demo`` needs only the local PostgreSQL and RabbitMQ. It creates
its own databases (the coordinator's, and one per participant) and RabbitMQ vhost,
named after a run id so that runs never collide; starts the coordinator and the three
participants of ``examples/shop`` as child processes; runs one order that completes
and one whose payment is refused, so that its first two steps are compensated; prints
each transition as it happens, then each saga's final state and history, and what the
services' own databases hold; stops every process with SIGTERM; and drops what it
created (unless ``--keep``). Exit status 0 only if everything ended as it should.

``--setup-only`` and ``--attach`` split that in two for docker compose: the first
creates the databases and migrates, the second drives an already running coordinator
and participants (started by compose) and checks the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import grpc
import psycopg
from aiormq.exceptions import AMQPConnectionError, AMQPError, ProbableAuthenticationError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from coordinator import config
from coordinator.cli import render
from coordinator.cli.client import Remote, connect, follow
from coordinator.cli.errors import CliError, ExitCode
from sagaplane import structs, topology
from sagaplane.urls import redact
from sagaplane.v1 import coordinator_pb2, saga_pb2

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagaplane_demo"

EPILOG = """\
Databases: the coordinator uses the database of --database-url, and each participant
one named after it with _orders, _inventory or _payment appended. A plain run appends
a run id to the name, creates them all, and drops them at the end (--keep keeps them).

RabbitMQ: a plain run creates a vhost sagaplane-demo-<run id> with rabbitmqctl when the
broker is on this machine and rabbitmqctl works (deleted at the end unless --keep);
otherwise it uses the vhost of --amqp-url.

docker compose runs `sagaplane demo --setup-only` once, then the coordinator and the
participants as services, then `sagaplane demo --attach` against them.
"""


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The demo's flags."""
    database_url = env.get("SAGAPLANE_DEMO_DATABASE_URL", DEFAULT_DATABASE_URL)
    parser.add_argument(
        "--database-url",
        default=database_url,
        help="the demo coordinator's database; the participants' are named after it "
        f"[SAGAPLANE_DEMO_DATABASE_URL; default {config.shown(database_url)}]",
    )
    amqp_url = env.get("SAGAPLANE_AMQP_URL", config.DEFAULT_AMQP_URL)
    parser.add_argument(
        "--amqp-url",
        default=amqp_url,
        help=f"RabbitMQ [SAGAPLANE_AMQP_URL; default {config.shown(amqp_url)}]",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the databases and the vhost at the end (to look at them)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="also show the processes' logs"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--setup-only",
        action="store_true",
        help="create the databases (if missing) and migrate the coordinator's, then exit",
    )
    mode.add_argument(
        "--attach",
        action="store_true",
        help="start nothing: run the sagas against the coordinator at --coordinator and "
        "participants already running",
    )
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=env.get("SAGAPLANE_COORDINATOR") or config.DEFAULT_LISTEN,
        help="with --attach: the coordinator [SAGAPLANE_COORDINATOR; default %(default)s]",
    )
    parser.add_argument(
        "--startup-timeout",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="how long the processes may take to be ready (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo in the mode asked for."""
    shop = _shop()
    demo = Demo(args, shop)
    return asyncio.run(_interruptible(demo.main()))


async def _interruptible(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``, turning SIGTERM into cancellation (as asyncio does for Ctrl-C), so
    that the cleanup runs and no child process outlives the demo."""
    task: asyncio.Task[int] = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130


def _shop() -> ModuleType:
    """``examples.shop.services``, from a source checkout when it is not importable."""
    try:
        return importlib.import_module("examples.shop.services")
    except ModuleNotFoundError:
        pass
    root = _checkout_root()
    if root is None:
        raise CliError(
            "the demo needs the examples/ directory of a Sagaplane source checkout "
            "(run it from the checkout, or add it to PYTHONPATH)"
        )
    sys.path.insert(0, str(root))
    return importlib.import_module("examples.shop.services")


def _checkout_root() -> Path | None:
    # An editable install runs this file from the checkout itself: coordinator/cli/demo.py.
    root = Path(__file__).resolve().parents[2]
    return root if (root / "examples" / "shop" / "__main__.py").is_file() else None


def with_dbname(url: str, dbname: str) -> str:
    """The same server and user, another database (URLs stay URLs)."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        return urlunsplit(parts._replace(path="/" + quote(dbname)))
    return make_conninfo(url, dbname=dbname)


def dbname_of(url: str) -> str:
    """The database a libpq URL or key/value string names."""
    name = conninfo_to_dict(url).get("dbname")
    if not name:
        raise CliError(f"{redact(url)} names no database", ExitCode.USAGE)
    return str(name)


def with_vhost(url: str, vhost: str) -> str:
    """The same broker and user, another vhost."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


@dataclass
class Child:
    """A child process whose stderr is kept (its last lines) and optionally echoed."""

    name: str
    proc: asyncio.subprocess.Process
    echo: bool
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    drain: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(
        cls, name: str, argv: Sequence[str], env: Mapping[str, str], echo: bool
    ) -> Child:
        """Start ``argv``; its stdout is discarded, its stderr (the logs) kept."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        child = cls(name, proc, echo)
        child.drain = asyncio.create_task(child._drain(), name=f"demo-drain-{name}")
        return child

    async def _drain(self) -> None:
        # Read continuously: a child blocked on a full pipe would stop working.
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self.echo:
                print(f"      [{self.name}] {line}", flush=True)

    def check_alive(self) -> None:
        """Raise if the process has already exited."""
        if self.proc.returncode is not None:
            raise CliError(
                f"{self.name} (pid {self.proc.pid}) exited with status {self.proc.returncode}"
                f" during start-up; its last log lines:\n{self.logs()}"
            )

    def logs(self) -> str:
        """The last lines it wrote to stderr, indented."""
        return "\n".join(f"    {line}" for line in self.tail) or "    (nothing)"

    async def stop(self, grace: float = 20.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                status = await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            status = await self.proc.wait()
        if self.drain is not None:
            with contextlib.suppress(Exception):
                await self.drain
        return status


@dataclass(frozen=True)
class Outcome:
    """One saga run by the demo: its final form, and what should have happened."""

    title: str
    saga: saga_pb2.Saga
    expected_state: int
    expected_steps: tuple[int, ...]

    def problems(self) -> list[str]:
        """What differs from the expectation (empty: as expected)."""
        found = []
        if self.saga.state != self.expected_state:
            found.append(
                f"{self.title}: state {render.saga_state(self.saga.state)}, expected "
                f"{render.saga_state(self.expected_state)}"
            )
        statuses = tuple(s.status for s in self.saga.steps)
        if statuses != self.expected_steps:
            found.append(
                f"{self.title}: steps {[render.step_status(s) for s in statuses]}, expected "
                f"{[render.step_status(s) for s in self.expected_steps]}"
            )
        return found


class Demo:
    """One run of the demo."""

    def __init__(self, args: argparse.Namespace, shop: ModuleType) -> None:
        self.args = args
        self.shop = shop
        self.services: tuple[str, ...] = tuple(shop.SERVICES)
        self.t0 = time.monotonic()
        self.run_id = secrets.token_hex(3)
        self.database_url: str = args.database_url
        self.amqp_url: str = args.amqp_url
        self.children: list[Child] = []
        self.outcomes: list[Outcome] = []
        self.problems: list[str] = []

    # -- output ---------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        """A line of output, flushed at once (the demo is watched as it happens)."""
        try:
            print(text, flush=True)
        except BrokenPipeError:
            # The reader went away (`| head`): carry on quietly, so that the cleanup runs.
            _silence_stdout()

    def step(self, text: str) -> None:
        """A progress line, with the time since the demo started."""
        self.say(f"[{time.monotonic() - self.t0:6.2f}s] {text}")

    # -- the modes --------------------------------------------------------------------

    async def main(self) -> int:
        """Run the mode asked for; the exit status."""
        if self.args.setup_only:
            return await self.setup_only()
        if self.args.attach:
            return await self.attached()
        return await self.standalone()

    async def setup_only(self) -> int:
        """Create the databases if missing, migrate the coordinator's, exit."""
        urls = self.participant_urls()
        for url in [self.database_url, *urls.values()]:
            created = await self.create_database(url, exist_ok=True)
            self.step(f"database {dbname_of(url)} {'created' if created else 'already exists'}")
        await self.migrate()
        return ExitCode.OK

    async def attached(self) -> int:
        """Drive a coordinator and participants that something else started."""
        self.say(f"Sagaplane demo against the coordinator at {self.args.coordinator}")
        await self.wait_ready(self.args.coordinator, self.amqp_url)
        status = await self.play(self.args.coordinator)
        self.say("\n" + self.verdict_line(status))
        return status

    async def standalone(self) -> int:
        """Everything: databases, vhost, processes, sagas, checks, shutdown, cleanup."""
        base = dbname_of(self.database_url)
        self.database_url = with_dbname(self.database_url, f"{base}_{self.run_id}")
        self.say(f"Sagaplane demo (run {self.run_id})")
        async with AsyncExitStack() as cleanup:
            await self.check_broker()
            vhost = await self.create_resources(cleanup)
            await self.migrate()
            target = await self.spawn_all(cleanup)
            await self.wait_ready(target, self.amqp_url)
            status = await self.play(target)
            await self.stop_all()
        if self.args.keep:
            self.say(
                f"\nKept databases {dbname_of(self.database_url)}*"
                + (f" and vhost {vhost}" if vhost else "")
                + f". Look: psql {self.database_url} -c 'TABLE sagaplane_history'"
            )
        else:
            self.step("dropped the demo's databases" + (" and vhost" if vhost else ""))
        self.say("\n" + self.verdict_line(status))
        return status

    async def create_resources(self, cleanup: AsyncExitStack) -> str | None:
        """The run's databases and vhost, all at once; removed on exit unless --keep.

        Returns the vhost, or None when the URL's vhost is used.
        """
        urls = [self.database_url, *self.participant_urls().values()]
        created: list[str] = []

        async def create(url: str) -> None:
            await self.create_database(url, exist_ok=False)
            created.append(url)

        if not self.args.keep:
            cleanup.push_async_callback(self.drop_databases, created)
        # Everything finishes (no half-created leftovers) before a failure is raised.
        results = await asyncio.gather(
            self.create_vhost(), *(create(url) for url in urls), return_exceptions=True
        )
        vhost = results[0] if isinstance(results[0], str) else None
        if vhost is not None:
            self.amqp_url = with_vhost(self.amqp_url, vhost)
            if not self.args.keep:
                cleanup.push_async_callback(self.delete_vhost, vhost)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.step(
            f"created databases {dbname_of(self.database_url)} (coordinator), "
            + ", ".join(dbname_of(u) for u in self.participant_urls().values())
            + f" on {self.server_of(self.database_url)}"
        )
        return vhost

    # -- set-up -------------------------------------------------------------------------

    def participant_urls(self) -> dict[str, str]:
        """Each service's database: the coordinator's name + ``_<service>``."""
        base = dbname_of(self.database_url)
        return {s: with_dbname(self.database_url, f"{base}_{s}") for s in self.services}

    @staticmethod
    def server_of(url: str) -> str:
        """``host:port`` of a PostgreSQL URL, for messages."""
        info = conninfo_to_dict(url)
        return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}"

    async def admin(self) -> psycopg.AsyncConnection[Any]:
        """A connection to the server's ``postgres`` database, to create and drop others."""
        url = with_dbname(self.database_url, "postgres")
        try:
            return await psycopg.AsyncConnection.connect(url, autocommit=True)
        except psycopg.OperationalError as exc:
            raise CliError(
                f"cannot connect to PostgreSQL at {redact(url)}: {str(exc).strip()}\n"
                "The demo needs a running PostgreSQL (see --database-url).",
                ExitCode.UNAVAILABLE,
            ) from exc

    async def create_database(self, url: str, *, exist_ok: bool) -> bool:
        """CREATE DATABASE; False if it existed and ``exist_ok``."""
        name = dbname_of(url)
        async with await self.admin() as conn:
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if await cur.fetchone() is not None:
                if exist_ok:
                    return False
                raise CliError(f"database {name} already exists; not touching it")
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True

    async def drop_databases(self, urls: list[str]) -> None:
        """DROP DATABASE each, even with connections left (the processes are gone by then)."""

        async def drop(url: str) -> None:
            name = dbname_of(url)
            try:
                async with await self.admin() as conn:
                    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    await conn.execute(statement.format(sql.Identifier(name)))
            except (CliError, psycopg.Error) as exc:
                # The rest of the cleanup still runs; the user learns what is left.
                self.say(f"could not drop database {name} ({exc}): dropdb {name}")

        await asyncio.gather(*(drop(url) for url in urls))

    async def migrate(self) -> None:
        """Apply the coordinator's migrations (participants apply theirs at start)."""
        from coordinator.store.migrate import migrate

        applied = await migrate(self.database_url)
        self.step(
            f"migrated {dbname_of(self.database_url)}: "
            + (
                ", ".join(f"{m.component}/{m.version:04d}_{m.name}" for m in applied)
                or "up to date"
            )
        )

    def rabbitmqctl_usable(self) -> bool:
        """rabbitmqctl manages the node on this machine only."""
        host = urlsplit(self.amqp_url).hostname or "localhost"
        return host in ("127.0.0.1", "localhost", "::1") and shutil.which("rabbitmqctl") is not None

    async def rabbitmqctl(self, *args: str) -> str | None:
        """Run rabbitmqctl; None on success, else what it said."""
        try:
            proc = await asyncio.create_subprocess_exec(
                "rabbitmqctl",
                "-q",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(30):
                out, _ = await proc.communicate()
        except (OSError, TimeoutError) as exc:
            return str(exc) or type(exc).__name__
        if proc.returncode != 0:
            return out.decode(errors="replace").strip().splitlines()[-1:][0] if out else "failed"
        return None

    async def create_vhost(self) -> str | None:
        """A vhost of the run's own, or None (then the URL's vhost is used)."""
        vhost = f"sagaplane-demo-{self.run_id}"
        user = urlsplit(self.amqp_url).username or "guest"
        problem = "rabbitmqctl is not available for this broker"
        if self.rabbitmqctl_usable():
            problem = await self.rabbitmqctl("add_vhost", vhost) or ""
            if not problem:
                problem = (
                    await self.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
                    or ""
                )
                if not problem:
                    self.step(f"created RabbitMQ vhost {vhost}")
                    return vhost
                await self.rabbitmqctl("delete_vhost", vhost)
        self.step(f"using the RabbitMQ vhost of {redact(self.amqp_url)} ({problem})")
        return None

    async def check_broker(self) -> None:
        """Fail with a clear message before creating anything, rather than later with four
        children's tracebacks."""
        try:
            async with _amqp(self.amqp_url):
                pass
        except AMQPConnectionError as exc:
            raise CliError(
                f"cannot connect to RabbitMQ at {redact(self.amqp_url)}: {exc}\n"
                "The demo needs a running RabbitMQ (see --amqp-url).",
                ExitCode.UNAVAILABLE,
            ) from exc

    async def delete_vhost(self, vhost: str) -> None:
        """Delete the run's vhost (its queues and messages go with it); say so if it stays."""
        for delay in (1, 2, 4, 0):
            problem = await self.rabbitmqctl("delete_vhost", vhost)
            if problem is None:
                return
            # The broker may be restarting; it usually is back within seconds.
            await asyncio.sleep(delay)
        self.say(f"could not delete vhost {vhost} ({problem}): rabbitmqctl delete_vhost {vhost}")

    # -- processes ----------------------------------------------------------------------

    async def spawn_all(self, cleanup: AsyncExitStack) -> str:
        """Start the coordinator and the participants at once; the coordinator's address."""
        port = _free_port()
        target = f"127.0.0.1:{port}"
        env = dict(os.environ)
        # The children import examples.shop from the checkout (it is not installed).
        root = _checkout_root()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(root), env.get("PYTHONPATH", "")) if p
            )
        # Run the SAME interpreter and code as this command, whatever PATH holds.
        coordinator_argv = [
            sys.executable,
            "-m",
            "coordinator.cli",
            "serve",
            "--database-url",
            self.database_url,
            "--amqp-url",
            self.amqp_url,
            "--listen",
            target,
            "--pool-size",
            "3",
            "--grace",
            "2",
            "--no-migrate",
        ]
        # Stopped (LIFO) before the databases they use are dropped.
        cleanup.push_async_callback(self.stop_all)
        echo = self.args.verbose
        self.children.append(await Child.spawn("coordinator", coordinator_argv, env, echo))
        for service, url in self.participant_urls().items():
            argv = [sys.executable, "-m", "examples.shop", service]
            argv += ["--database-url", url, "--amqp-url", self.amqp_url]
            self.children.append(await Child.spawn(service, argv, env, echo))
        self.step(
            "started "
            + ", ".join(f"{c.name} (pid {c.proc.pid})" for c in self.children)
            + f"; coordinator on {target}"
        )
        return target

    async def stop_all(self) -> None:
        """SIGTERM every child at once, wait for each; safe to call twice."""
        children, self.children = self.children, []
        if not children:
            return
        statuses = await asyncio.gather(*(c.stop() for c in children))
        self.step(
            "stopped "
            + ", ".join(f"{c.name} (exit {s})" for c, s in zip(children, statuses, strict=True))
        )
        for child, status in zip(children, statuses, strict=True):
            if status != 0:
                self.say(f"  {child.name} exited with {status}; its last log lines:")
                self.say(child.logs())

    def check_children(self) -> None:
        """Fail fast when a child died."""
        for child in self.children:
            child.check_alive()

    async def wait_ready(self, target: str, amqp_url: str) -> None:
        """Until the coordinator is SERVING and every participant consumes its queue."""
        try:
            async with asyncio.timeout(self.args.startup_timeout):
                await self.wait_serving(target)
                self.step(f"coordinator at {target} is SERVING")
                await self.wait_consumers(amqp_url)
                self.step("participants " + ", ".join(self.services) + " are consuming")
        except TimeoutError:
            logs = "".join(f"\n  {c.name}:\n{c.logs()}" for c in self.children)
            raise CliError(
                f"not ready after {self.args.startup_timeout:g}s (--startup-timeout)" + logs,
                ExitCode.UNAVAILABLE,
            ) from None

    async def wait_serving(self, target: str) -> None:
        """Poll the gRPC health service."""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.check_children()
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)

    async def wait_consumers(self, amqp_url: str) -> None:
        """Poll RabbitMQ until each participant's queue has a consumer."""
        queues = [topology.participant_queue(s) for s in self.services]
        while True:
            self.check_children()
            try:
                async with _amqp(amqp_url) as connection:
                    while True:
                        self.check_children()
                        waiting = [q for q in queues if not await _has_consumer(connection, q)]
                        if not waiting:
                            return
                        await asyncio.sleep(0.1)
            except ProbableAuthenticationError as exc:
                raise CliError(
                    f"RabbitMQ at {redact(amqp_url)} refused the login: {exc}",
                    ExitCode.UNAVAILABLE,
                ) from exc
            except AMQPConnectionError:
                # The broker may still be starting (compose): keep trying until the timeout.
                await asyncio.sleep(0.5)

    # -- the sagas ------------------------------------------------------------------------

    async def play(self, target: str) -> int:
        """Run both sagas, show them, check them and the services' databases."""
        limit = self.shop.PAYMENT_LIMIT
        plans = [
            (
                "Saga 1: an order of 42. Every step completes.",
                self.shop.order_steps(amount=42),
                saga_pb2.SAGA_STATE_COMPLETED,
                (saga_pb2.STEP_STATUS_COMPLETED,) * 3,
            ),
            (
                f"Saga 2: an order of 5000. Payment refuses amounts over {limit}, so the charge "
                "fails\n        and the steps done so far are undone, newest first.",
                self.shop.order_steps(amount=5000),
                saga_pb2.SAGA_STATE_COMPENSATED,
                (
                    saga_pb2.STEP_STATUS_COMPENSATED,
                    saga_pb2.STEP_STATUS_COMPENSATED,
                    saga_pb2.STEP_STATUS_FAILED,
                ),
            ),
        ]
        outcomes: list[Outcome] = []
        async with connect(target, 10.0) as remote:
            for title, steps, state, statuses in plans:
                self.say("")
                self.say(title)
                saga = await self.run_saga(remote, steps)
                outcomes.append(Outcome(title.split(":")[0], saga, state, statuses))
        self.say("\nFinal state and history")
        for outcome in outcomes:
            self.say("")
            self.say(render.saga_text(outcome.saga, history=True))
        problems = [p for o in outcomes for p in o.problems()]
        problems += await self.show_services([o.saga.id for o in outcomes])
        self.outcomes, self.problems = outcomes, problems
        return ExitCode.OK if not problems else ExitCode.ERROR

    async def run_saga(self, remote: Remote, steps: list[dict[str, Any]]) -> saga_pb2.Saga:
        """Start one order saga and follow it, transition by transition, until it ends."""
        request = coordinator_pb2.StartSagaRequest(
            name="order.place",
            context=structs.to_struct({"customer": "demo"}),
            steps=[
                coordinator_pb2.StepSpec(
                    name=s["name"],
                    action=s["action"],
                    compensation=s.get("compensation", ""),
                    input=structs.to_struct(s.get("input")),
                )
                for s in steps
            ],
        )
        saga = (await remote.call(remote.sagas.StartSaga, request)).saga
        try:
            return await follow(
                remote, saga.id, interval=0.02, max_wait=60, show=self.say, indent="  "
            )
        except TimeoutError:
            raise CliError(f"saga {saga.id} has not ended after 60s") from None

    async def show_services(self, saga_ids: list[str]) -> list[str]:
        """What each service's own database says about both sagas; problems found."""
        first, second = saga_ids
        checks = [
            ("orders", "shop_orders", "created", "cancelled"),
            ("inventory", "shop_reservations", "reserved", "released"),
            ("payment", "shop_payments", "charged", None),
        ]
        urls = self.participant_urls()
        rows, problems = [], []
        for service, table, ok, undone in checks:
            async with await psycopg.AsyncConnection.connect(urls[service]) as conn:
                query = sql.SQL("SELECT saga_id, status FROM {} WHERE saga_id = ANY(%s)").format(
                    sql.Identifier(table)
                )
                cur = await conn.execute(query, (saga_ids,))
                found = {saga_id: status for saga_id, status in await cur.fetchall()}
            got = (found.get(first), found.get(second))
            rows.append([service, table, got[0] or "(no row)", got[1] or "(no row)"])
            if got != (ok, undone):
                problems.append(f"{service}: {table} says {got}, expected {(ok, undone)}")
        self.say("\nIn the services' own databases (each wrote in its own local transaction)")
        self.say(render.table(["SERVICE", "TABLE", "SAGA 1", "SAGA 2"], rows, indent="  "))
        return problems

    def verdict_line(self, status: int) -> str:
        """The last line: what happened, in one sentence."""
        if status == ExitCode.OK:
            first, second = self.outcomes
            return (
                f"Demo OK in {time.monotonic() - self.t0:.1f}s: saga {first.saga.id} "
                f"{render.saga_state(first.saga.state)}, saga {second.saga.id} "
                f"{render.saga_state(second.saga.state)}."
            )
        return "Demo FAILED:\n" + "\n".join(f"  {p}" for p in self.problems)


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def _amqp(url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(
        url, client_properties={"connection_name": "sagaplane-demo"}
    )
    try:
        yield connection
    finally:
        await connection.close()


async def _has_consumer(connection: aio_pika.abc.AbstractConnection, queue: str) -> bool:
    # A passive declare of a queue that does not exist yet closes the channel: one each time.
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return bool(result.consumer_count)
    except AMQPError:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
