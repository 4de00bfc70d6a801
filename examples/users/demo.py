"""``python -m examples.users demo``: the users example end to end, in one process.

It needs only the local PostgreSQL and RabbitMQ. It creates three databases named
after a run id (the coordinator's, the users service's and the partner's) and a
RabbitMQ vhost (with rabbitmqctl, when the broker is on this machine; otherwise it uses
the vhost of ``--amqp-url``); runs a coordinator and both participants in this
process; seeds ``--users`` existing users; and then:

1. creates a user (``users.create``, 2 s deadline): every other user's score is
   updated, in one round trip;
2. creates another while a competing transaction holds one user's row: the attempt
   ends at its deadline and nothing of the new user is left;
3. imports ``--rows`` users in chunks of ``--chunk``, one saga per chunk (import, then
   notify partner acme);
4. imports a chunk with bad rows: refused with an error per row, nothing written;
5. imports a chunk for partner globex, which refuses it: the saga is compensated and
   the chunk deleted.

It prints each outcome, checks it, and drops what it created (unless ``--keep``).
Exit status: 0 if everything ended as it should, 1 if not, 3 if PostgreSQL or
RabbitMQ cannot be reached, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import shutil
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import psycopg
from aiormq.exceptions import AMQPConnectionError

from coordinator.app import Coordinator
from coordinator.config import Settings, shown
from examples.users import service
from sagaplane import SagaClient, defaults
from sagaplane.sagas import Saga, SagaState
from sagaplane.testing import (
    RabbitmqctlFailed,
    create_database,
    create_vhost,
    database_name,
    delete_vhost,
    drop_database,
    with_database,
    with_vhost,
)
from sagaplane.urls import redact

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagaplane_users"

OK, FAILED, UNAVAILABLE = 0, 1, 3


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The demo's flags."""
    database_url = env.get("SAGAPLANE_DEMO_DATABASE_URL", DEFAULT_DATABASE_URL)
    parser.add_argument(
        "--database-url",
        default=database_url,
        help="the coordinator's database; the services' are named after it, and a run "
        f"id is appended to all [SAGAPLANE_DEMO_DATABASE_URL; default {shown(database_url)}]",
    )
    amqp_url = env.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL)
    parser.add_argument(
        "--amqp-url",
        default=amqp_url,
        help=f"RabbitMQ [SAGAPLANE_AMQP_URL; default {shown(amqp_url)}]",
    )
    parser.add_argument(
        "--users", type=int, default=10_000, help="existing users (default %(default)s)"
    )
    parser.add_argument(
        "--rows", type=int, default=1_200, help="users to import (default %(default)s)"
    )
    parser.add_argument(
        "--chunk", type=int, default=500, help="users per import saga (default %(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases and the vhost at the end"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; its exit status."""
    # The SDK's warnings (an attempt past its deadline) show, indented under the scene.
    logging.basicConfig(level=logging.WARNING, format="           %(name)s: %(message)s")
    try:
        return asyncio.run(Demo(args).main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped")
        return 130


class Demo:
    """One run of the demo."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        run_id = secrets.token_hex(3)
        base = f"{database_name(args.database_url)}_{run_id}"
        self.urls = {
            name: with_database(args.database_url, base + suffix)
            for name, suffix in (("coordinator", ""), ("users", "_users"), ("partner", "_partner"))
        }
        self.vhost = f"sagaplane-users-{run_id}"
        self.amqp_url: str = args.amqp_url
        self.problems: list[str] = []

    def say(self, text: str = "") -> None:
        """A line of output, with the time since the start."""
        print(f"[{time.monotonic() - self.t0:6.2f}s] {text}" if text else "", flush=True)

    def expect(self, ok: bool, problem: str) -> None:
        """Note a problem unless ``ok``."""
        if not ok:
            self.problems.append(problem)
            self.say(f"  PROBLEM: {problem}")

    async def main(self) -> int:
        """Set up, play the five scenes, clean up; the exit status."""
        try:
            async with AsyncExitStack() as stack:
                await self.set_up(stack)
                await self.play()
        except (psycopg.OperationalError, AMQPConnectionError) as exc:
            print(f"demo: cannot reach PostgreSQL or RabbitMQ: {str(exc).strip()}")
            return UNAVAILABLE
        self.say(
            "dropped the demo's databases"
            if not self.args.keep
            else "kept: " + ", ".join(database_name(u) for u in self.urls.values())
        )
        if self.problems:
            print("Demo FAILED:\n" + "\n".join(f"  {p}" for p in self.problems))
            return FAILED
        print(f"Demo OK in {time.monotonic() - self.t0:.1f}s.")
        return OK

    async def set_up(self, stack: AsyncExitStack) -> None:
        """Databases, vhost, tables, seed users, the coordinator and both participants."""
        connection = await aio_pika.connect(self.amqp_url)  # fail early and clearly
        await connection.close()
        for url in self.urls.values():
            await create_database(url, exist_ok=False)
            if not self.args.keep:
                stack.push_async_callback(drop_database, url)
        await self.own_vhost(stack)
        self.say(
            f"created databases {', '.join(database_name(u) for u in self.urls.values())}; "
            f"RabbitMQ at {redact(self.amqp_url)}"
        )
        for name in ("users", "partner"):
            await service.create_tables(name, self.urls[name])
        await service.seed_users(self.urls["users"], self.args.users)
        self.say(f"seeded {self.args.users} users")
        settings = Settings(
            database_url=self.urls["coordinator"], amqp_url=self.amqp_url, listen="127.0.0.1:0"
        )
        self.coordinator = await stack.enter_async_context(Coordinator(settings))
        for name, build in service.BUILDERS.items():
            await stack.enter_async_context(build(self.amqp_url, self.urls[name]))
        self.say(f"coordinator on port {self.coordinator.port}; participants users, partner")

    async def own_vhost(self, stack: AsyncExitStack) -> None:
        """A vhost of the run's own where rabbitmqctl manages the broker."""
        host = urlsplit(self.amqp_url).hostname or "localhost"
        if host not in ("127.0.0.1", "localhost", "::1") or not shutil.which("rabbitmqctl"):
            return
        try:
            await create_vhost(self.vhost, urlsplit(self.amqp_url).username or "guest")
        except RabbitmqctlFailed:
            return
        if not self.args.keep:
            stack.push_async_callback(delete_vhost, self.vhost)
        self.amqp_url = with_vhost(self.amqp_url, self.vhost)

    async def play(self) -> None:
        """The five scenes."""
        async with SagaClient(f"127.0.0.1:{self.coordinator.port}") as client:
            scenes = (self.create, self.create_locked, self.imports, self.bad_rows, self.refused)
            for scene in scenes:
                print()
                await scene(client)
        print()

    async def saga(
        self, client: SagaClient, name: str, steps: list[Any], **kwargs: Any
    ) -> tuple[Saga, float]:
        """Start a saga and wait for its end; it and the seconds that took."""
        started = time.monotonic()
        saga = await client.start_saga(name, steps, **kwargs)
        saga = await client.wait(saga.id, timeout=60)
        return await client.get_saga(saga.id, include_history=True), time.monotonic() - started

    async def rows(self, query: str, *params: Any) -> list[Any]:
        """What the users database says."""
        async with await psycopg.AsyncConnection.connect(self.urls["users"]) as conn:
            cur = await conn.execute(query.encode(), params or None)
            return await cur.fetchall()

    async def create(self, client: SagaClient) -> None:
        """Scene 1: the pgx article's transaction."""
        self.say("1. users.create 'ada' (the pgx article; deadline 2 s)")
        saga, took = await self.saga(
            client, "users.create", service.create_user_steps("ada", "Ada", "Lovelace")
        )
        step = saga.step("create")
        self.say(f"   {saga.state} in {took:.2f}s: {step.output}")
        at = {h.event: h.at for h in saga.history if h.step_name == "create"}
        dispatched, done = at.get("step_dispatched"), at.get("step_completed")
        if dispatched and done:
            self.say(
                f"   the step took {(done - dispatched).total_seconds():.2f}s of its 2 s, "
                "dispatch to completion (the coordinator's clock)"
            )
        self.expect(saga.state == SagaState.COMPLETED, f"users.create ended {saga.state}")
        self.expect(
            step.output is not None and step.output.get("scores_updated") == self.args.users,
            f"expected {self.args.users} scores updated",
        )

    async def create_locked(self, client: SagaClient) -> None:
        """Scene 2: a competing transaction holds a row the step must update."""
        self.say("2. users.create 'bob' while another transaction holds user-1's row")
        async with await psycopg.AsyncConnection.connect(self.urls["users"]) as holder:
            await holder.execute("SELECT 1 FROM users WHERE username = 'user-1' FOR UPDATE")
            saga, took = await self.saga(
                client,
                "users.create",
                service.create_user_steps("bob", "Bob", "Builder", attempts=1),
            )
        step = saga.step("create")
        self.say(f"   {saga.state} after {took:.2f}s: {step.error}")
        left = await self.rows("SELECT count(*) FROM users WHERE username = 'bob'")
        self.say(f"   users named bob: {left[0][0]}")
        self.expect(saga.state == SagaState.FAILED, f"the locked create ended {saga.state}")
        self.expect("deadline exceeded after 2.0s" in step.error, "no deadline error")
        self.expect(left == [(0,)], "a partial user was left")

    async def imports(self, client: SagaClient) -> None:
        """Scene 3: a bulk import, one saga per chunk."""
        rows = [
            {"username": f"imported-{n}", "firstname": "Imported", "lastname": f"No {n}"}
            for n in range(1, self.args.rows + 1)
        ]
        size = self.args.chunk
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        self.say(f"3. import {len(rows)} users in {len(chunks)} chunks of {size} (partner acme)")
        started = time.monotonic()
        ids = []
        for i, chunk in enumerate(chunks):
            steps = service.import_steps(chunk, chunk=i, first_row=i * size + 1, partner="acme")
            ids.append((await client.start_saga("users.import", steps)).id)
        ended = [await client.wait(saga_id, timeout=60) for saga_id in ids]
        took = time.monotonic() - started
        states = sorted({str(s.state) for s in ended})
        count = await self.rows("SELECT count(*) FROM users WHERE username LIKE 'imported-%%'")
        self.say(f"   {len(ended)} sagas {', '.join(states)} in {took:.2f}s; {count[0][0]} users")
        self.expect(states == ["completed"], f"import sagas ended {states}")
        self.expect(count == [(len(rows),)], f"{count[0][0]} users imported of {len(rows)}")

    async def bad_rows(self, client: SagaClient) -> None:
        """Scene 4: a chunk with bad rows is refused whole, with an error per row."""
        rows: list[dict[str, Any]] = [
            {"username": f"late-{n}", "firstname": "Late", "lastname": f"No {n}"}
            for n in range(1, 21)
        ]
        rows[2]["username"] = ""
        rows[9]["username"] = "ada"
        rows[16]["lastname"] = "x" * 101
        self.say("4. import a chunk of 20 users, 3 of them bad")
        steps = service.import_steps(rows, chunk=99, first_row=1, partner="acme")
        saga, _ = await self.saga(client, "users.import", steps)
        error = saga.step("import").error
        self.say(f"   {saga.state}: {error}")
        late = await self.rows("SELECT count(*) FROM users WHERE username LIKE 'late-%%'")
        self.expect(saga.state == SagaState.FAILED, f"the bad chunk ended {saga.state}")
        for expected in ("row 3: username is required", "row 10: username 'ada' is already used",
                         "row 17: lastname is longer than 100 characters"):  # fmt: skip
            self.expect(expected in error, f"no {expected!r} in the error")
        self.expect(late == [(0,)], "rows of the bad chunk were written")

    async def refused(self, client: SagaClient) -> None:
        """Scene 5: the partner refuses; the import is compensated."""
        rows = [{"username": f"globex-{n}", "firstname": "G", "lastname": "X"} for n in range(50)]
        self.say("5. import 50 users for partner globex, which refuses them")
        steps = service.import_steps(rows, chunk=100, first_row=1, partner="globex")
        saga, _ = await self.saga(client, "users.import", steps)
        self.say(f"   {saga.state}: {saga.step('notify').error}")
        left = await self.rows("SELECT count(*) FROM users WHERE username LIKE 'globex-%%'")
        self.say(f"   users of the chunk left: {left[0][0]}")
        self.expect(saga.state == SagaState.COMPENSATED, f"the refused import ended {saga.state}")
        self.expect(left == [(0,)], "the refused chunk was not deleted")
