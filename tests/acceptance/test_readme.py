"""The README tells the truth: its commands run as written and do what it says."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.app import Coordinator
from coordinator.cli import build_parser
from examples.shop.__main__ import build_parser as build_shop_parser
from examples.shop.services import order_steps
from examples.users.__main__ import build_parser as build_users_parser
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from helpers.shop import Shop, shop, shop_databases
from sagaplane import (
    Delivery,
    NonRetryableError,
    Processed,
    RetryableError,
    SagaClient,
    StepContext,
    StepKind,
    StepSpec,
    topology,
)
from sagaplane.testing import Child, wait_for_consumers

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = str(Path(sys.executable).parent)
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
__all__ = ["shop", "shop_databases"]  # fixtures, imported for pytest

ULID_IN = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")


# -- reading the README -------------------------------------------------------------------


def section(title: str) -> str:
    """The text under ``## title``, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def fenced(text: str, lang: str) -> list[str]:
    """The contents of every ```lang block in ``text``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def marked(title: str, marker: str, lang: str) -> str:
    """The ```lang block right after the HTML comment containing ``marker``."""
    match = re.search(
        rf"<!--[^>]*{re.escape(marker)}[^>]*-->\n```{lang}\n(.*?)^```", section(title), re.M | re.S
    )
    assert match, f"README section {title!r} has no ```{lang} block marked {marker!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The shell commands of a block, as written: a command goes on while a quote is
    open or a line ends with a backslash; comment lines and blank lines separate."""
    found: list[str] = []
    pending: list[str] = []
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        text = "\n".join(pending)
        if text.endswith("\\"):
            continue
        try:
            shlex.split(text, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        found.append(text)
        pending = []
    assert not pending, f"unterminated command: {pending}"
    return found


def quick_start_commands() -> list[str]:
    """Every command of the Quick start, in order."""
    return [c for block in fenced(section("Quick start"), "sh") for c in commands(block)]


def test_the_quick_start_is_two_commands_demo_then_tests() -> None:
    assert quick_start_commands() == ["scripts/demo", "scripts/test"]
    for script in ("scripts/demo", "scripts/test"):
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    # The test command is the one CI runs.
    assert "\nscripts/test\n" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# -- the grpcurl walkthrough -----------------------------------------------------------------


@dataclass
class Ran:
    """One README command after it ran: what it printed and the shell's $ID after."""

    command: str
    status: int
    out: str
    err: str
    saga_id: str

    def json(self) -> Any:
        assert self.status == 0, f"{self.command!r} failed: {self.err}"
        return json.loads(self.out)


async def run_as_written(
    cmds: list[str], env: dict[str, str], workdir: Path, scratch: Path
) -> list[Ran]:
    """Run the commands one after the other in ONE bash (variables carry over), each
    exactly as written, keeping each one's output and status apart."""
    script = []
    for i, cmd in enumerate(cmds):
        out, err, rc, saga = (scratch / f"{i}.{x}" for x in ("out", "err", "rc", "id"))
        # A brace group runs in the same shell, so `ID=$(...)` and `export` persist.
        script.append(f'{{\n{cmd}\n}} >{out} 2>{err}\necho $? >{rc}\nprintf %s "${{ID-}}" >{saga}')
    (scratch / "walkthrough.sh").write_text("\n".join(script) + "\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        "bash", str(scratch / "walkthrough.sh"), cwd=workdir, env=env
    )
    assert await proc.wait() == 0
    return [
        Ran(
            command=cmd,
            status=int((scratch / f"{i}.rc").read_text()),
            out=(scratch / f"{i}.out").read_text(),
            err=(scratch / f"{i}.err").read_text(),
            saga_id=(scratch / f"{i}.id").read_text(),
        )
        for i, cmd in enumerate(cmds)
    ]


def fresh_shell_env(**extra: str) -> dict[str, str]:
    """The environment of a new terminal: no SAGAPLANE_* settings, no .venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != VENV_BIN
    )
    env.pop("VIRTUAL_ENV", None)
    return env | extra


async def test_every_grpcurl_command_of_the_walkthrough_works_as_written(
    coordinator: Coordinator, database_url: str, tmp_path: Path
) -> None:
    cmds = commands(marked("Walk through the API with grpcurl", "runs every command", "sh"))
    env = fresh_shell_env(SAGAPLANE_COORDINATOR=f"127.0.0.1:{coordinator.port}")
    results = await run_as_written(cmds, env, ROOT, tmp_path)
    saga_id = next((r.saga_id for r in results if r.saga_id), "")

    def path(r: Ran) -> None:
        assert r.status == 0, r.err

    def address(r: Ran) -> None:
        assert r.status == 0, r.err

    def listed_services(r: Ran) -> None:
        assert r.status == 0, r.err
        assert set(r.out.split()) >= {
            "sagaplane.v1.SagaCoordinatorService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }

    def described(r: Ran) -> None:
        assert r.status == 0, r.err
        for rpc in ("StartSaga", "GetSaga", "Compensate", "ListActive"):
            assert f"rpc {rpc} (" in r.out

    def healthy(r: Ran) -> None:
        assert r.json() == {"status": "SERVING"}

    def started(r: Ran) -> None:
        assert r.status == 0, r.err
        assert ULID.match(r.saga_id), f"ID is {r.saga_id!r}"

    def echoed(r: Ran) -> None:
        assert r.out.strip() == saga_id

    def got(r: Ran) -> None:
        saga = r.json()["saga"]
        assert saga["id"] == saga_id
        assert saga["name"] == "order.place"
        assert saga["state"] == "SAGA_STATE_STARTED"
        assert saga["context"] == {"customer": "c-1"}
        assert [(s["name"], s["status"]) for s in saga["steps"]] == [
            ("create", "STEP_STATUS_STARTED"),
            ("charge", "STEP_STATUS_PENDING"),
        ]
        assert saga["steps"][0]["input"] == {"sku": "book", "qty": 2}
        assert [h["event"] for h in saga["history"]] == ["saga_started", "step_dispatched"]

    def listed_active(r: Ran) -> None:
        assert saga_id in [s["id"] for s in r.json()["sagas"]]

    def compensating(r: Ran) -> None:
        saga = r.json()["saga"]
        assert saga["id"] == saga_id
        # COMPENSATED once the relay found no queue for the command (it is then known
        # never to have been delivered); COMPENSATING if it had not tried it yet.
        assert saga["state"] in ("SAGA_STATE_COMPENSATED", "SAGA_STATE_COMPENSATING")

    def not_found(r: Ran) -> None:
        assert r.status != 0
        assert "Code: NotFound" in r.out + r.err

    checks: list[tuple[Callable[[str], bool], Callable[[Ran], None]]] = [
        (lambda c: c.startswith("export PATH="), path),
        (lambda c: c.startswith("ADDR="), address),
        (lambda c: c.endswith(" list"), listed_services),
        (lambda c: " describe " in c, described),
        (lambda c: c.endswith("grpc.health.v1.Health/Check"), healthy),
        (lambda c: c.startswith("ID=$(") and "/StartSaga" in c, started),
        (lambda c: c.startswith("echo "), echoed),
        (lambda c: "/GetSaga" in c and "$ID" in c, got),
        (lambda c: c.endswith("/ListActive"), listed_active),
        (lambda c: c.endswith("/Compensate"), compensating),
        (lambda c: "/GetSaga" in c and "no-such-saga" in c, not_found),
    ]
    used = set()
    for r in results:
        matching = [(i, check) for i, (applies, check) in enumerate(checks) if applies(r.command)]
        assert len(matching) == 1, f"README command with no (or no single) check: {r.command!r}"
        i, check = matching[0]
        used.add(i)
        check(r)
    assert used == set(range(len(checks))), "the walkthrough lost a command the test expects"

    # What the walkthrough says happened, happened in the coordinator's database.
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT state FROM sagaplane_sagas WHERE id = %s", (saga_id,))
        [(state,)] = await cur.fetchall()
        assert state in ("compensated", "compensating")


# -- the CLI section ---------------------------------------------------------------------


async def test_the_readme_saga_file_starts_that_saga(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    order = tmp_path / "order.yaml"
    order.write_text(marked("The command line", "starts a saga", "yaml"), encoding="utf-8")
    sagaplane = str(Path(VENV_BIN) / "sagaplane")
    address = f"127.0.0.1:{coordinator.port}"
    ids = []
    for _ in range(2):  # the file's idempotency key makes the second start a replay
        proc = await asyncio.create_subprocess_exec(
            sagaplane, "start", str(order), "--json", "--coordinator", address,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        saga = json.loads(out)
        ids.append(saga["id"])
    assert ids[0] == ids[1]
    assert saga["name"] == "order.place"
    assert saga["idempotency_key"] == "order-1001"
    steps = saga["steps"]
    assert [s.get("depends_on", []) for s in steps] == [
        [],
        ["create"],
        ["create"],
        ["reserve"],
        ["reserve", "validate_address", "gift_wrap"],
    ]
    assert steps[3]["when"] == "context.gift == true"
    assert steps[4]["timeout"] == "10s"
    # Not dispatched yet (no participant runs here): the reference is as written.
    assert steps[4]["input"] == {"amount": 42, "order_id": "${steps.create.output.order_id}"}
    # It is the demo shop's order saga, step for step.
    shop = order_steps(qty=2, amount=42)
    assert [(s["name"], s["action"], s.get("compensation", ""), s["input"]) for s in steps] == [
        (s["name"], s["action"], s.get("compensation", ""), s["input"]) for s in shop
    ]


async def test_the_readme_cli_commands_run_as_written(
    coordinator: Coordinator, shop: Shop, tmp_path: Path
) -> None:
    """The saga file's commands, against the demo participants: the start follows the
    saga to its end, `get` shows its history and `list --all` finds it finished."""
    title = "The command line"
    (tmp_path / "order.yaml").write_text(marked(title, "starts a saga", "yaml"), encoding="utf-8")
    start, get, listing = commands(marked(title, "runs these with the demo participants", "sh"))
    assert shlex.split(start, comments=True) == ["sagaplane", "start", "order.yaml", "--watch"]
    example_id = shlex.split(get)[2]
    assert ULID.match(example_id), get
    env = {
        **fresh_shell_env(SAGAPLANE_COORDINATOR=f"127.0.0.1:{coordinator.port}"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    (ran_start,) = await run_as_written([start], env, tmp_path, tmp_path)
    assert ran_start.status == 0, ran_start.err
    assert "-> completed" in ran_start.out, ran_start.out
    saga_id = ULID_IN.search(ran_start.out + ran_start.err).group(0)
    ran_get, ran_list = await run_as_written(
        [get.replace(example_id, saga_id), listing], env, tmp_path, tmp_path
    )
    assert ran_get.status == 0, ran_get.err
    assert "saga_completed" in ran_get.out and "charge" in ran_get.out, ran_get.out
    listed = ran_list.json()
    assert [s["state"] for s in listed if s["id"] == saga_id] == ["SAGA_STATE_COMPLETED"], listed


async def test_the_readme_import_runs_as_written(
    coordinator: Coordinator, database_url: str, tmp_path: Path
) -> None:
    text = section("The command line")
    after = text[text.index("imports the next three blocks") :]
    template, rows = fenced(after, "yaml")[0], fenced(after, "csv")[0]
    [command] = commands(fenced(after, "sh")[0])
    (tmp_path / "order-template.yaml").write_text(template, encoding="utf-8")
    (tmp_path / "orders.csv").write_text(rows, encoding="utf-8")
    argv = shlex.split(command)
    assert argv[0] == "sagaplane"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    env["SAGAPLANE_COORDINATOR"] = f"127.0.0.1:{coordinator.port}"
    proc = await asyncio.create_subprocess_exec(
        str(Path(VENV_BIN) / "sagaplane"), *argv[1:], cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "  started      2" in out.decode()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT s.context, st.position, st.input FROM sagaplane_sagas s"
            " JOIN sagaplane_steps st ON st.saga_id = s.id"
            " ORDER BY s.context->>'customer', st.position"
        )
        found = await cur.fetchall()
    assert found == [
        ({"customer": "c-1"}, 0, {"sku": "book", "qty": 2}),
        ({"customer": "c-1"}, 1, {"order": "${steps.create.output.order_id}", "amount": 42}),
        ({"customer": "c-2"}, 0, {"sku": "pen", "qty": 10}),
        ({"customer": "c-2"}, 1, {"order": "${steps.create.output.order_id}", "amount": 15.5}),
    ]


# -- the Python section -------------------------------------------------------------------


async def test_the_readme_participant_registers_and_refuses_big_amounts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    participant_code, batch_code, middleware_code, client_code = fenced(
        section("Writing a participant in Python"), "python"
    )
    # The recipe's export (step 1).
    monkeypatch.setenv("SAGAPLANE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/payment")
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(participant_code, "README.md", "exec"), namespace)
    exec(compile(middleware_code, "README.md", "exec"), namespace)
    assert namespace["audit"].service == "audit"
    assert namespace["audit"].actions == ["audit.record"]
    delivery = Delivery(message=None, command=None, kind=None, refusal=None)  # type: ignore[arg-type]

    async def call_next() -> Processed:
        return Processed.HANDLED

    await namespace["timed"](delivery, call_next)

    payment = namespace["payment"]
    assert payment.service == "payment"
    assert payment.actions == [
        "payment.charge",
        "payment.refund",
        "payment.send_receipt",
    ]
    ctx = StepContext(
        saga_id="s", saga_name="order.place", step_id="st", step_name="charge", attempt=1,
        kind=StepKind.EXECUTE, action="payment.charge", input={"amount": 5000}, context={},
        output=None, message_id="m", tx=None,  # type: ignore[arg-type]
    )  # fmt: skip
    with pytest.raises(NonRetryableError, match="over the limit"):
        await namespace["charge"](ctx)
    # The batch snippet is a program of its own: past its deadline's cutoff, settle
    # refuses before writing anything (the recipe's test runs it to completion).
    ledger: dict[str, Any] = {"__name__": "readme"}
    exec(compile(batch_code, "README.md", "exec"), ledger)
    assert ledger["ledger"].actions == ["ledger.settle"]
    late = dataclasses.replace(
        ctx, action="ledger.settle", input={"entry_ids": [1]}, _cutoff=time.monotonic()
    )
    with pytest.raises(RetryableError, match="too little time left"):
        await ledger["settle"](late)

    # The client snippet is a program of its own (run by the recipe's test).
    assert "asyncio.run(main())" in client_code
    compile(client_code, "README.md", "exec")


async def test_the_readme_participant_recipe_runs_as_written(
    coordinator: Coordinator, amqp_url: str, tmp_path: Path
) -> None:
    """The recipe, step by step: its database, its participant file and its saga file as
    the README gives them, run with its commands; the saga completes, and with the
    failing input it is compensated; without the database the participant says so."""
    title = "Writing a participant in Python"
    (tmp_path / "payment.py").write_text(marked(title, "payment.py", "python"))
    (tmp_path / "pay.yaml").write_text(marked(title, "starts this saga", "yaml"))
    run_participant, start = commands(
        re.search(r"\*\*4\. Run them\*\*.*?```sh\n(.*?)```", section(title), re.S).group(1)
    )
    assert shlex.split(run_participant) == [".venv/bin/python", "payment.py"]
    assert shlex.split(start) == [".venv/bin/sagaplane", "start", "pay.yaml", "--watch"]
    name = unique_name("sagaplane_recipe")
    env = {
        **os.environ,
        "SAGAPLANE_DATABASE_URL": server_url(name),
        "SAGAPLANE_AMQP_URL": amqp_url,
        "SAGAPLANE_COORDINATOR": f"127.0.0.1:{coordinator.port}",
    }

    # Without its database: one line, exit 3.
    missing = await asyncio.create_subprocess_exec(
        sys.executable, "payment.py", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(missing.communicate(), 60)
    assert missing.returncode == 3, err.decode()
    assert f"payment: cannot connect to PostgreSQL at {server_url(name)}" in err.decode()
    assert f'database "{name}" does not exist (create it first' in err.decode()
    assert "Traceback" not in err.decode()

    await create_database(name)  # step 1 (createdb)
    participant = Child("payment", [sys.executable, "payment.py"], cwd=str(tmp_path), env=env)
    try:
        await participant.start()
        await wait_for_consumers(
            amqp_url, [topology.participant_queue("payment")], alive=participant.check_alive
        )

        async def sagaplane_start() -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                str(Path(VENV_BIN) / "sagaplane"), *shlex.split(start)[1:],
                cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode() + err.decode()

        status, out = await sagaplane_start()
        assert status == 0, out
        assert "-> completed" in out
        # With the documented failing input: the receipt fails, the charge is refunded.
        saga_file = tmp_path / "pay.yaml"
        saga_file.write_text(saga_file.read_text().replace("ada@example.com", "nobody"))
        status, out = await sagaplane_start()
        assert status == 6, out
        assert "-> compensated" in out and "cannot send a receipt to 'nobody'" in out
        async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
            cur = await conn.execute("SELECT amount::float, status FROM payments ORDER BY status")
            assert await cur.fetchall() == [(42.0, "charged"), (42.0, "refunded")]
        # The SagaClient program of the same section, against the same participant.
        (tmp_path / "client.py").write_text(
            marked(title, "runs this as a program", "python"), encoding="utf-8"
        )
        client = await asyncio.create_subprocess_exec(
            sys.executable, "client.py", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out_b, err_b = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err_b.decode()
        assert out_b.decode().splitlines() == ["completed {'charged': 42}", "started 3 sagas"]
        # The middleware program of the same section, on the same database.
        (tmp_path / "audit.py").write_text(
            marked(title, "runs this middleware as a program", "python"), encoding="utf-8"
        )
        audit = Child("audit", [sys.executable, "audit.py"], cwd=str(tmp_path), env=env)
        try:
            await audit.start()
            await wait_for_consumers(
                amqp_url, [topology.participant_queue("audit")], alive=audit.check_alive
            )
            async with SagaClient(env["SAGAPLANE_COORDINATOR"]) as sagas:
                audited = await sagas.start_saga(
                    "audit.it", [StepSpec("record", "audit.record", input={"n": 1})]
                )
                assert (await sagas.wait(audited.id)).completed
            await audit.stop()
            assert audit.returncode == 0
            audit_log = audit.tail()
            assert f"saga {audited.id}: {{'n': 1}}" in audit_log, audit_log
            assert re.search(r"execute audit\.record: \S+ in \d+\.\d{3}s", audit_log), audit_log
        finally:
            await audit.stop()
        # The batch program of the same section: one round trip settles three entries.
        (tmp_path / "ledger.py").write_text(
            marked(title, "runs this batch as a program", "python"), encoding="utf-8"
        )
        ledger = Child("ledger", [sys.executable, "ledger.py"], cwd=str(tmp_path), env=env)
        try:
            await ledger.start()
            await wait_for_consumers(
                amqp_url, [topology.participant_queue("ledger")], alive=ledger.check_alive
            )
            async with SagaClient(env["SAGAPLANE_COORDINATOR"]) as sagas:
                settled = await sagas.start_saga(
                    "ledger.settle",
                    [StepSpec("settle", "ledger.settle", input={"entry_ids": [3, 5, 7]})],
                )
                done = await sagas.wait(settled.id)
                assert done.completed, done
                assert done.steps[0].output == {"settled": 3}
            async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
                cur = await conn.execute(
                    "SELECT array_agg(id ORDER BY id) FROM entries WHERE status = 'settled'"
                )
                assert await cur.fetchone() == ([3, 5, 7],)
                cur = await conn.execute("SELECT saga_id, n FROM settlements")
                assert await cur.fetchall() == [(settled.id, 3)]
        finally:
            await ledger.stop()
        await participant.stop()
        assert participant.returncode == 0
        log = participant.tail()
        assert (
            "participant payment consuming sagaplane.participant.payment "
            "(payment.charge, payment.refund, payment.send_receipt)" in log
        ), log
    finally:
        await participant.stop()
        await drop_database(name)


# -- the configuration reference ---------------------------------------------------------


def _parsers(
    parser: argparse.ArgumentParser, prog: str = "sagaplane"
) -> dict[str, argparse.ArgumentParser]:
    found = {prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prog} {name}"] = sub
    return found


async def test_the_readme_event_consumer_runs_as_written(amqp_url: str, tmp_path: Path) -> None:
    """The Domain events program: it consumes the event it emits, once, and exits."""
    (tmp_path / "notify.py").write_text(
        marked("Domain events", "notify.py", "python"), encoding="utf-8"
    )
    name = unique_name("sagaplane_notify")
    await create_database(name)
    try:
        env = {
            **os.environ,
            "SAGAPLANE_DATABASE_URL": server_url(name),
            "SAGAPLANE_AMQP_URL": amqp_url,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "notify.py", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["order.created web 7 {'order_id': 7}"]
        async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
            cur = await conn.execute("SELECT consumer, source FROM sagaplane_event_inbox")
            assert await cur.fetchall() == [("mailer", "web")]
    finally:
        await drop_database(name)


async def test_the_readme_replica_examples_run_as_written(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """The program and the commands of "Several coordinators behind one client", against
    three coordinators on one database and vhost (on free ports: the README's three
    addresses are replaced by theirs, and nothing else)."""
    title = "Operations"
    program = marked(title, "runs this against three replicas", "python")
    cmds = commands(marked(title, "runs these against three replicas", "sh"))
    written = [f"127.0.0.1:{port}" for port in (50051, 50052, 50053)]
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                Coordinator(coordinator_settings(database_url, amqp_url))
            )
            for _ in written
        ]

        def on_free_ports(text: str) -> str:
            assert all(address in text for address in written), text
            for address, replica in zip(written, replicas, strict=True):
                text = text.replace(address, f"127.0.0.1:{replica.port}")
            return text

        (tmp_path / "replicas.py").write_text(on_free_ports(program), encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(tmp_path / "replicas.py"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=fresh_shell_env(),
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        saga_id, state = out.decode().split()
        assert ULID.match(saga_id) and state == "started", out
        env = {**fresh_shell_env(), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
        # One shell, as pasted: the export carries over to the command after it.
        ran = await run_as_written(
            [on_free_ports(c) if "SAGAPLANE_COORDINATOR" in c else c for c in cmds],
            env,
            tmp_path,
            tmp_path,
        )
        assert all(r.status == 0 for r in ran), [r.err for r in ran]
        assert [s["id"] for s in ran[-1].json()] == [saga_id]


def test_the_readme_documents_every_flag_and_environment_variable() -> None:
    readme = README.read_text(encoding="utf-8")
    missing = []
    parsers = (
        _parsers(build_parser(env={}))
        | _parsers(build_shop_parser(), "python -m examples.shop")
        | _parsers(build_users_parser(), "python -m examples.users")
    )
    for command, parser in parsers.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and f"`{flag}" not in readme:
                    missing.append(f"{command} {flag}")
            for variable in re.findall(r"SAGAPLANE_[A-Z_]+", action.help or ""):
                if f"`{variable}" not in readme:
                    missing.append(f"{command}: {variable}")
    assert not missing, f"README's configuration lacks: {missing}"
