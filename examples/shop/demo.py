"""``python -m examples.shop demo``: the demo shop, end to end, with real processes.

A plain run needs only the local PostgreSQL and RabbitMQ. It creates its own databases
(the coordinator's, and one per participant) and RabbitMQ vhost, named after a run id so
that runs never collide; starts the coordinator and the five participants of
``examples/shop`` as child processes; runs one order that completes and one whose
payment is refused, so that what was done is compensated; prints each transition as it
happens, then each saga's final state and history, what the services' own databases
hold, and the domain events the notifications service consumed; stops every process
with SIGTERM; and drops what it created (unless ``--keep``). Exit status 0 only if
everything ended as it should.

``--setup-only`` and ``--attach`` split that in two for docker compose: the first
creates the databases and migrates, the second drives an already running coordinator
and participants (started by compose) and checks the outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import psycopg
from aiormq.exceptions import AMQPConnectionError, ProbableAuthenticationError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from coordinator import config
from coordinator.cli import render
from coordinator.cli.client import connect_to, follow
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from coordinator.store.migrate import migrate
from examples.shop import services as shop
from sagaplane import defaults, topology
from sagaplane.client import SagaClient
from sagaplane.sagas import Saga, SagaState, StepStatus
from sagaplane.testing import (
    Child,
    ChildExited,
    RabbitmqctlFailed,
    create_database,
    create_vhost,
    database_name,
    delete_vhost,
    drop_database,
    free_port,
    wait_for_consumers,
    with_database,
    with_vhost,
)
from sagaplane.urls import redact

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagaplane_demo"

EPILOG = """\
Databases: the coordinator uses the database of --database-url, and each participant
one named after it with _orders, _inventory, _fulfillment or _payment appended. A plain
run appends a run id to the name, creates them all, and drops them at the end (--keep
keeps them).

RabbitMQ: a plain run creates a vhost sagaplane-demo-<run id> with rabbitmqctl when the
broker is on this machine and rabbitmqctl works (deleted at the end unless --keep);
otherwise it uses the vhost of --amqp-url.

docker compose runs `python -m examples.shop demo --setup-only` once, then the
coordinator and the participants as services, then `python -m examples.shop demo
--attach` against them.

Exit status: 0 if both sagas ended as they should, 1 if not (or on an unexpected
error), 2 for bad flags, 3 if PostgreSQL, RabbitMQ or the coordinator cannot be
reached, 130 when interrupted.
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
    amqp_url = env.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL)
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
        default=env.get("SAGAPLANE_COORDINATOR") or defaults.COORDINATOR_ADDRESS,
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
    """Run the demo in the mode asked for; the exit status (errors printed)."""
    try:
        return asyncio.run(_interruptible(Demo(args).main()))
    except CliError as exc:
        print(f"demo: error: {exc.message}", file=sys.stderr)
        return exc.code


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


def dbname_of(url: str) -> str:
    """The database a libpq URL or key/value string names (a usage error if none)."""
    try:
        return database_name(url)
    except ValueError:
        raise CliError(f"{redact(url)} names no database", ExitCode.USAGE) from None


@dataclass(frozen=True)
class Outcome:
    """One saga run by the demo: its final form, and what should have happened."""

    title: str
    saga: Saga
    expected_state: SagaState
    expected_steps: tuple[StepStatus, ...]

    def problems(self) -> list[str]:
        """What differs from the expectation (empty: as expected)."""
        found = []
        if self.saga.state != self.expected_state:
            found.append(f"{self.title}: state {self.saga.state}, expected {self.expected_state}")
        statuses = tuple(s.status for s in self.saga.steps)
        if statuses != self.expected_steps:
            found.append(
                f"{self.title}: steps {[str(s) for s in statuses]}, expected "
                f"{[str(s) for s in self.expected_steps]}"
            )
        return found


class Demo:
    """One run of the demo."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
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
        # The reader may go away (`| head`): say() then carries on quietly, so that the
        # cleanup runs.
        say(text)

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
        self.database_url = with_database(self.database_url, f"{base}_{self.run_id}")
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
                # Masked: a password must not reach the terminal's scrollback (or a CI log).
                + f". Look: psql {redact(self.database_url)} -c 'TABLE sagaplane_history'"
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
        return {s: with_database(self.database_url, f"{base}_{s}") for s in self.services}

    @staticmethod
    def server_of(url: str) -> str:
        """``host:port`` of a PostgreSQL URL, for messages."""
        info = conninfo_to_dict(url)
        return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}"

    async def create_database(self, url: str, *, exist_ok: bool) -> bool:
        """CREATE DATABASE; False if it existed and ``exist_ok``."""
        try:
            return await create_database(url, exist_ok=exist_ok)
        except psycopg.errors.DuplicateDatabase:
            raise CliError(f"database {dbname_of(url)} already exists; not touching it") from None
        except psycopg.OperationalError as exc:
            raise CliError(
                f"cannot connect to PostgreSQL at {redact(with_database(url, 'postgres'))}: "
                f"{str(exc).strip()}\nThe demo needs a running PostgreSQL (see --database-url).",
                ExitCode.UNAVAILABLE,
            ) from exc

    async def drop_databases(self, urls: list[str]) -> None:
        """DROP DATABASE each, even with connections left (the processes are gone by then)."""

        async def drop(url: str) -> None:
            try:
                await drop_database(url)
            except psycopg.Error as exc:
                # The rest of the cleanup still runs; the user learns what is left.
                name = dbname_of(url)
                self.say(f"could not drop database {name} ({exc}): dropdb {name}")

        await asyncio.gather(*(drop(url) for url in urls))

    async def migrate(self) -> None:
        """Apply the coordinator's migrations (participants apply theirs at start)."""
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

    async def create_vhost(self) -> str | None:
        """A vhost of the run's own, or None (then the URL's vhost is used)."""
        vhost = f"sagaplane-demo-{self.run_id}"
        user = urlsplit(self.amqp_url).username or "guest"
        problem = "rabbitmqctl is not available for this broker"
        if self.rabbitmqctl_usable():
            try:
                await create_vhost(vhost, user)
            except RabbitmqctlFailed as exc:
                problem = str(exc).strip().splitlines()[-1]
            else:
                self.step(f"created RabbitMQ vhost {vhost}")
                return vhost
        self.step(f"using the RabbitMQ vhost of {redact(self.amqp_url)} ({problem})")
        return None

    async def check_broker(self) -> None:
        """Fail with a clear message before creating anything, rather than later with four
        children's tracebacks."""
        try:
            connection = await aio_pika.connect(self.amqp_url)
            await connection.close()
        except AMQPConnectionError as exc:
            raise CliError(
                f"cannot connect to RabbitMQ at {redact(self.amqp_url)}: {exc}\n"
                "The demo needs a running RabbitMQ (see --amqp-url).",
                ExitCode.UNAVAILABLE,
            ) from exc

    async def delete_vhost(self, vhost: str) -> None:
        """Delete the run's vhost (its queues and messages go with it); say so if it stays."""
        problem = ""
        for delay in (1, 2, 4, 0):
            try:
                await delete_vhost(vhost)
                return
            except RabbitmqctlFailed as exc:
                problem = str(exc).strip().splitlines()[-1]
            # The broker may be restarting; it usually is back within seconds.
            await asyncio.sleep(delay)
        self.say(f"could not delete vhost {vhost} ({problem}): rabbitmqctl delete_vhost {vhost}")

    # -- processes ----------------------------------------------------------------------

    async def spawn_all(self, cleanup: AsyncExitStack) -> str:
        """Start the coordinator and the participants at once; the coordinator's address."""
        target = f"127.0.0.1:{free_port()}"
        # Run the SAME interpreter and code as this command, whatever PATH holds; the
        # participants import examples.shop from where this file is.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
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
        argvs = {"coordinator": coordinator_argv}
        for service, url in self.participant_urls().items():
            argvs[service] = [sys.executable, "-m", "examples.shop", service]
            argvs[service] += ["--database-url", url, "--amqp-url", self.amqp_url]
        for name, argv in argvs.items():
            child = Child(name, argv, env=env, echo=self._echo(name), tail_lines=30)
            await child.start()
            self.children.append(child)
        self.step(
            "started "
            + ", ".join(f"{c.name} (pid {c.pid})" for c in self.children)
            + f"; coordinator on {target}"
        )
        return target

    def _echo(self, name: str) -> Callable[[str], None] | None:
        if not self.args.verbose:
            return None
        return lambda line: print(f"      [{name}] {line}", flush=True)

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
                self.say(_indented(child.tail()))

    def check_children(self) -> None:
        """Fail fast when a child died."""
        for child in self.children:
            try:
                child.check_alive()
            except ChildExited:
                raise CliError(
                    f"{child.name} (pid {child.pid}) exited with status {child.returncode}"
                    f" during start-up; its last log lines:\n{_indented(child.tail())}"
                ) from None

    async def wait_ready(self, target: str, amqp_url: str) -> None:
        """Until the coordinator is SERVING and every participant consumes its queue."""
        queues = [topology.participant_queue(s) for s in self.services]
        queues.append(topology.events_queue("notifications"))
        try:
            async with asyncio.timeout(self.args.startup_timeout):
                async with SagaClient(target) as client:
                    await client.wait_until_serving(float("inf"), alive=self.check_children)
                self.step(f"coordinator at {target} is SERVING")
                await wait_for_consumers(amqp_url, queues, alive=self.check_children)
                self.step("participants " + ", ".join(self.services) + " are consuming")
        except ProbableAuthenticationError as exc:
            raise CliError(
                f"RabbitMQ at {redact(amqp_url)} refused the login: {exc}", ExitCode.UNAVAILABLE
            ) from exc
        except TimeoutError:
            logs = "".join(f"\n  {c.name}:\n{_indented(c.tail())}" for c in self.children)
            raise CliError(
                f"not ready after {self.args.startup_timeout:g}s (--startup-timeout)" + logs,
                ExitCode.UNAVAILABLE,
            ) from None

    # -- the sagas ------------------------------------------------------------------------

    async def play(self, target: str) -> int:
        """Run both sagas, show them, check them and the services' databases."""
        limit = shop.PAYMENT_LIMIT
        done, undone = StepStatus.COMPLETED, StepStatus.COMPENSATED
        plans = [
            (
                "Saga 1: a gift order of 42. The reservation and the address check run side\n"
                "        by side, the gift wrap runs (context.gift is true), then the charge,\n"
                "        with the order id that create returned.",
                shop.order_context(gift=True),
                shop.order_steps(amount=42),
                SagaState.COMPLETED,
                (done,) * 5,
            ),
            (
                f"Saga 2: an order of 5000, no gift. The gift wrap is skipped; payment refuses\n"
                f"        amounts over {limit}, so the charge fails and what was done is undone,\n"
                "        each step after the steps that depend on it (the address check has\n"
                "        nothing to undo).",
                shop.order_context(gift=False),
                shop.order_steps(amount=5000),
                SagaState.COMPENSATED,
                (undone, undone, done, StepStatus.SKIPPED, StepStatus.FAILED),
            ),
        ]
        outcomes: list[Outcome] = []
        async with connect_to(target, 10.0) as client:
            for title, context, steps, state, statuses in plans:
                self.say("")
                self.say(title)
                saga = await self.run_saga(client, steps, context)
                outcomes.append(Outcome(title.split(":")[0], saga, state, statuses))
        self.say("\nFinal state and history")
        for outcome in outcomes:
            self.say("")
            self.say(render.saga_text(outcome.saga.proto, history=True))
        problems = [p for o in outcomes for p in o.problems()]
        problems += await self.show_services([o.saga.id for o in outcomes])
        problems += await self.show_events([o.saga.id for o in outcomes])
        self.outcomes, self.problems = outcomes, problems
        return ExitCode.OK if not problems else ExitCode.ERROR

    async def run_saga(
        self, client: SagaClient, steps: list[dict[str, Any]], context: dict[str, Any]
    ) -> Saga:
        """Start one order saga and follow it, transition by transition, until it ends."""
        saga = await client.start_saga("order.place", steps, context=context)
        try:
            return await follow(
                client, saga.id, interval=0.02, max_wait=60, show=self.say, indent="  "
            )
        except TimeoutError:
            raise CliError(f"saga {saga.id} has not ended after 60s") from None

    async def show_services(self, saga_ids: list[str]) -> list[str]:
        """What each service's own database says about both sagas; problems found."""
        first, second = saga_ids
        # (service, table, its column of the order id, saga 1's status, saga 2's): None
        # is "no row".
        checks = [
            ("orders", "shop_orders", "id", "created", "cancelled"),
            ("inventory", "shop_reservations", None, "reserved", "released"),
            ("fulfillment", "shop_addresses", "order_id", "valid", "valid"),
            ("fulfillment", "shop_gift_wraps", "order_id", "wrapped", None),
            ("payment", "shop_payments", "order_id", "charged", None),
        ]
        urls = self.participant_urls()
        rows, problems = [], []
        order_ids: dict[str, set[Any]] = {first: set(), second: set()}
        for service, table, order_column, ok, undone in checks:
            async with await psycopg.AsyncConnection.connect(urls[service]) as conn:
                query = sql.SQL(
                    "SELECT saga_id, status, {} FROM {} WHERE saga_id = ANY(%s)"
                ).format(
                    sql.Identifier(order_column) if order_column else sql.NULL,
                    sql.Identifier(table),
                )
                cur = await conn.execute(query, (saga_ids,))
                found = {}
                for saga_id, status, order_id in await cur.fetchall():
                    found[saga_id] = status
                    if order_column:
                        order_ids[saga_id].add(order_id)
            got = (found.get(first), found.get(second))
            rows.append([service, table, got[0] or "(no row)", got[1] or "(no row)"])
            if got != (ok, undone):
                problems.append(f"{service}: {table} says {got}, expected {(ok, undone)}")
        for saga_id, ids in order_ids.items():
            # Every service got the id that orders.create returned, by reference.
            if len(ids) != 1 or None in ids:
                problems.append(
                    f"saga {saga_id}: the services hold order ids {sorted(map(str, ids))}"
                )
        self.say("\nIn the services' own databases (each wrote in its own local transaction)")
        self.say(render.table(["SERVICE", "TABLE", "SAGA 1", "SAGA 2"], rows, indent="  "))
        return problems

    async def show_events(self, saga_ids: list[str]) -> list[str]:
        """The domain events the notifications service consumed; problems found.

        Both orders were created (``order.created``, even the one compensated later: it
        was created, and its ``orders.delete`` comes after), one was charged
        (``payment.charged``); each must be there exactly once."""
        first, second = saga_ids
        expected = sorted(
            [(first, "order.created"), (first, "payment.charged"), (second, "order.created")]
        )
        url = self.participant_urls()["notifications"]
        rows: list[tuple[Any, ...]] = []
        # Events are published after their steps commit, and consumed asynchronously.
        deadline = time.monotonic() + 15
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT saga_id, type, text FROM shop_notifications"
                    " WHERE saga_id = ANY(%s) ORDER BY id",
                    (saga_ids,),
                )
                rows = await cur.fetchall()
                if len(rows) >= len(expected) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        self.say(
            "\nDomain events (CloudEvents, emitted in the steps' transactions) that the"
            "\nnotifications service consumed, each once"
        )
        table = [
            ["saga 1" if saga_id == first else "saga 2", type_, text]
            for saga_id, type_, text in rows
        ]
        self.say(render.table(["SAGA", "EVENT", "NOTIFICATION"], table, indent="  "))
        got = sorted((saga_id, type_) for saga_id, type_, _ in rows)
        if got != expected:
            return [f"notifications: got events {got}, expected {expected}"]
        return []

    def verdict_line(self, status: int) -> str:
        """The last line: what happened, in one sentence."""
        if status == ExitCode.OK:
            first, second = self.outcomes
            return (
                f"Demo OK in {time.monotonic() - self.t0:.1f}s: saga {first.saga.id} "
                f"{first.saga.state}, saga {second.saga.id} "
                f"{second.saga.state}."
            )
        return "Demo FAILED:\n" + "\n".join(f"  {p}" for p in self.problems)


_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory examples/ is in: the participants' PYTHONPATH."""


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines()) or "    (nothing)"
