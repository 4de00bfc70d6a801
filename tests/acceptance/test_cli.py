"""The ``sagaplane`` console script, run as a user runs it: output, exit status, errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
import pytest

from coordinator.app import Coordinator
from coordinator.cli import main
from helpers.cli import SAGAPLANE, Result, sagaplane
from helpers.database import create_database, drop_database, server_url, unique_name
from helpers.processes import CoordinatorProcess, free_port
from helpers.shop import Shop, shop, shop_databases
from sagaplane import NonRetryableError, Participant, StepContext
from sagaplane.testing import Child

__all__ = ["shop", "shop_databases"]  # fixtures, imported for pytest


NOWHERE = "127.0.0.1:1"  # nothing listens there: connections are refused at once


def address(coordinator: Coordinator) -> str:
    return f"127.0.0.1:{coordinator.port}"


ORDER_JSON = {
    "name": "order.place",
    "context": {"customer": "c-1"},
    "steps": [
        {"name": "create", "action": "orders.create", "compensation": "orders.delete",
         "input": {"sku": "book", "qty": 2}},
        {"name": "reserve", "action": "inventory.reserve",
         "compensation": "inventory.release", "input": {"sku": "book", "qty": 2}},
        {"name": "charge", "action": "payment.charge", "compensation": "payment.refund",
         "input": {"amount": 42}},
    ],
}  # fmt: skip


def order_yaml(amount: float) -> str:
    return f"""\
# An order, as a person writes it.
name: order.place
context: {{customer: c-1}}
steps:
  - {{name: create, action: orders.create, compensation: orders.delete,
     input: {{sku: book, qty: 1}}}}
  - {{name: reserve, action: inventory.reserve, compensation: inventory.release,
     input: {{sku: book, qty: 1}}}}
  - {{name: charge, action: payment.charge, compensation: payment.refund,
     input: {{amount: {amount}}}}}
"""


# -- help and usage ------------------------------------------------------------------------


async def test_sagaplane_help_lists_every_command_and_the_exit_statuses() -> None:
    result = await sagaplane("--help")
    assert result.status == 0
    for command in ("serve", "migrate", "start", "import", "get", "list", "compensate", "watch"):
        assert f"    {command}" in result.out
    assert "exit status:" in result.out and "4  no saga has this id" in result.out

    bare = await sagaplane()
    assert bare.status == 2
    assert "usage: sagaplane" in bare.err

    # The demo is an example (python -m examples.shop demo), not part of the product.
    demo = await sagaplane("demo")
    assert demo.status == 2
    assert "invalid choice: 'demo'" in demo.err


@pytest.mark.parametrize(
    "command",
    ["serve", "migrate", "start", "import", "get", "list", "compensate", "watch", "resolve",
     "health"],
)  # fmt: skip
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sagaplane {command}")
    # Every setting that has an environment variable says which.
    if command not in ("migrate", "serve"):
        assert "[SAGAPLANE_COORDINATOR;" in out.replace("\n", " ").replace("  ", " ")


async def test_python_m_coordinator_is_sagaplane_serve() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "--help",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    serve = await sagaplane("serve", "--help")
    assert out.decode() == serve.out
    assert "--log-level" in serve.out


# -- serve and migrate ------------------------------------------------------------------


async def test_serve_runs_a_coordinator_until_sigterm(database_url: str, amqp_url: str) -> None:
    listen = f"127.0.0.1:{free_port()}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    serve = Child(
        "serve",
        [SAGAPLANE, "serve", "--amqp-url", amqp_url, "--listen", listen, "--grace", "1"],
        # The database from the environment, the rest from flags.
        env=clean | {"SAGAPLANE_DATABASE_URL": database_url},
        tail_lines=1000,
    )
    await serve.start()
    try:
        for _ in range(300):
            health = await sagaplane("health", "--coordinator", listen)
            if health.status == 0:
                break
            serve.check_alive()
            await asyncio.sleep(0.1)
        assert health.out.strip() == "SERVING"
    finally:
        status = await serve.stop(grace=20)
    logs = serve.tail(1000)
    assert status == 0, logs
    assert "coordinator stopped" in logs
    assert (await sagaplane("health", "--coordinator", listen)).status == 3


async def test_serve_says_which_service_it_cannot_reach(amqp_url: str, database_url: str) -> None:
    anywhere = ("--listen", "127.0.0.1:0")
    no_pg = await sagaplane(
        "serve", *anywhere, "--database-url", "postgresql://postgres@127.0.0.1:1/sagaplane"
    )
    assert no_pg.status == 3
    assert "cannot use PostgreSQL at postgresql://postgres@127.0.0.1:1/sagaplane" in no_pg.err
    assert "Traceback" not in no_pg.err

    # Every way of not getting to RabbitMQ: one line naming the broker and the vhost.
    vhost = amqp_url.rsplit("/", 1)[1]
    broker = amqp_url.split("@", 1)[1].rsplit("/", 1)[0]
    cases = {
        f"amqp://guest:secret@{broker}/{vhost}": (
            f"cannot connect to RabbitMQ at amqp://guest:***@{broker}/{vhost} (vhost "
            f"'{vhost}'): login refused for user 'guest' (wrong user name or password?)"
        ),
        f"amqp://guest:guest@{broker}/{vhost}-missing": (
            f"cannot connect to RabbitMQ at amqp://guest:***@{broker}/{vhost}-missing (vhost "
            f"'{vhost}-missing'): the broker refused vhost '{vhost}-missing': it does not "
            "exist, or user 'guest' may not use it (see `rabbitmqctl list_vhosts`, "
            f"`rabbitmqctl list_permissions -p {vhost}-missing`)"
        ),
        "amqp://guest:secret@127.0.0.1:1/": (
            "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/ (vhost '/'): "
            "connection refused (is it running, on this port?)"
        ),
    }
    for url, message in cases.items():
        result = await sagaplane(
            "serve", *anywhere, "--database-url", database_url, "--amqp-url", url
        )
        assert result.status == 3, result.err
        assert f"sagaplane: error: {message}\n" in result.err
        assert "Traceback" not in result.err and "InvalidFrameError" not in result.err
        assert "secret" not in result.err


async def python_m_coordinator(*args: str, **env: str) -> Result:
    """``python -m coordinator ARGS`` to its end, with no SAGAPLANE_* setting but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean | env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_a_second_coordinator_on_a_taken_address_is_refused(
    coordinator: Coordinator, amqp_url: str
) -> None:
    taken = address(coordinator)
    # Its own, empty database: refused before it touches anything, it migrates nothing.
    name = unique_name("sagaplane_cli_second")
    await create_database(name)
    try:
        second = await python_m_coordinator(
            "--listen", taken, "--amqp-url", amqp_url, SAGAPLANE_DATABASE_URL=server_url(name)
        )
        assert second.status == 3, second.err
        assert second.err.strip().splitlines()[-1] == (
            f"sagaplane: error: cannot listen on {taken}: address in use (is another "
            "coordinator running there? Two coordinators on one address would split the "
            "calls between them)"
        )
        assert "Traceback" not in second.err
        async with await psycopg.AsyncConnection.connect(server_url(name)) as conn:
            cur = await conn.execute(b"SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert await cur.fetchone() == (0,)
    finally:
        await drop_database(name)
    # The first one serves on, alone.
    assert (await sagaplane("health", "--coordinator", taken)).out.strip() == "SERVING"


async def test_migrate_applies_once_then_is_up_to_date() -> None:
    name = unique_name("sagaplane_cli_migrate")
    await create_database(name)
    try:
        first = await sagaplane("migrate", SAGAPLANE_DATABASE_URL=server_url(name))
        assert first.status == 0, first.err
        assert "applied coordinator/0001_sagas" in first.out
        assert "applied outbox/0001_outbox" in first.out
        again = await sagaplane("migrate", "--database-url", server_url(name))
        assert (again.status, again.out.strip()) == (
            0,
            f"{server_url(name)}: up to date, nothing to apply",
        )
    finally:
        await drop_database(name)

    missing = await sagaplane("migrate", "--database-url", server_url(name))
    assert missing.status == 3
    assert "does not exist" in missing.err


# -- start --------------------------------------------------------------------------------


async def test_start_takes_json_yaml_and_stdin(coordinator: Coordinator, tmp_path: Path) -> None:
    target = address(coordinator)
    as_json = tmp_path / "order.json"
    as_json.write_text(json.dumps(ORDER_JSON))
    table = await sagaplane("start", str(as_json), "--coordinator", target)
    assert table.status == 0, table.err
    assert "state     started" in table.out
    assert "1  create   orders.create" in table.out

    as_yaml = tmp_path / "order.yaml"
    as_yaml.write_text(order_yaml(5))
    saga = (await sagaplane("start", str(as_yaml), "--json", "--coordinator", target)).json()
    assert saga["state"] == "SAGA_STATE_STARTED"
    assert saga["steps"][2]["input"] == {"amount": 5}

    # A list of steps on stdin, named by flag; the environment gives the address.
    steps = json.dumps(ORDER_JSON["steps"][:1])
    piped = await sagaplane(
        "start", "-", "--name", "from.stdin", "--json", stdin=steps, SAGAPLANE_COORDINATOR=target
    )
    assert piped.json()["name"] == "from.stdin"


async def test_start_with_an_idempotency_key_starts_once(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    target = address(coordinator)
    path = tmp_path / "order.json"
    path.write_text(json.dumps(ORDER_JSON))
    args = ("start", str(path), "--idempotency-key", "k-1", "--json", "--coordinator", target)
    first, again = (await sagaplane(*args)).json(), (await sagaplane(*args)).json()
    assert first["id"] == again["id"]

    # For people: that it was already there, since when, and where it is now.
    table = await sagaplane(*args[:-3], "--coordinator", target)
    assert table.status == 0, table.err
    assert table.out.splitlines()[0] == (
        f"saga {first['id']} (order.place) was already started with idempotency key 'k-1', "
        f"at {first['created_at'][:10]} {first['created_at'][11:23]}Z; nothing new was "
        "started. It is started."
    )
    assert "state     started" in table.out
    fresh = await sagaplane("start", str(path), "--coordinator", target)
    assert fresh.out.splitlines()[0].startswith("started saga ")

    other = await sagaplane(
        "start", str(path), "--name", "other", "--idempotency-key", "k-1", "--coordinator", target
    )
    assert other.status == 5
    assert "refused: ALREADY_EXISTS" in other.err


async def test_start_refuses_bad_files_with_status_2(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    target = address(coordinator)
    cases = {
        "missing.yaml": None,
        "broken.yaml": "name: [unclosed",
        "broken.json": '{"name": ',
        "scalar.yaml": "just a string",
        "unknown.json": json.dumps({"name": "x", "stepz": []}),
        "date.yaml": "name: x\ncontext: {when: 2024-01-01}\nsteps: []",
    }
    messages = {
        "missing.yaml": "cannot read",
        "broken.yaml": "is not valid JSON or YAML",
        "broken.json": "is not valid JSON or YAML",
        "scalar.yaml": "must hold an object",
        "unknown.json": "stepz",
        "date.yaml": "not JSON",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        result = await sagaplane("start", str(tmp_path / name), "--coordinator", target)
        assert result.status == 2, (name, result.err)
        assert messages[name] in result.err, (name, result.err)

    # Well-formed, but the coordinator says what is wrong with it.
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"name": "x", "steps": []}))
    refused = await sagaplane("start", str(empty), "--coordinator", target)
    assert refused.status == 2
    assert "the coordinator refused the request: INVALID_ARGUMENT: steps" in refused.err


async def test_saga_files_take_common_durations_and_explain_their_mistakes(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    target = address(coordinator)
    path = tmp_path / "saga.yaml"
    path.write_text(
        "name: x\ntimeout: 10 seconds\nstep_timeout: 1m30s\n"
        "steps:\n  - {name: a, action: a.do, timeout: 1.5}\n"
    )
    saga = (await sagaplane("start", str(path), "--json", "--coordinator", target)).json()
    assert saga["steps"][0]["timeout"] == "1.500s"

    cases = {
        "timeout: 10 sekunden\nsteps: [{name: a, action: a.do}]": (
            "timeout: '10 sekunden' is not a duration; use a number of seconds (10, 1.5) "
            "or amounts with units (10s, 1m30s, 2h, 1d, 500ms, 10 seconds)"
        ),
        "steps: [{name: a, action: a.do, retry: {max_attempts: 2}}]": (
            "steps[0].retry: no such field; did you mean retry_policy?"
        ),
        "stepTimeOut: 3s\nsteps: [{name: a, action: a.do}]": (
            "stepTimeOut: no such field; did you mean step_timeout?"
        ),
    }
    for body, message in cases.items():
        path.write_text("name: x\n" + body)
        result = await sagaplane("start", str(path), "--coordinator", target)
        assert (result.status, result.err.strip()) == (2, f"sagaplane: error: {path}: {message}")

    steps_only = tmp_path / "steps.yaml"
    steps_only.write_text("- {name: a, action: a.do}\n")
    nameless = await sagaplane("start", str(steps_only), "--coordinator", target)
    assert nameless.status == 2
    assert "holds only a list of steps" in nameless.err
    assert "add `name: ...`" in nameless.err and "--name" in nameless.err
    assert "Traceback" not in nameless.err
    named = await sagaplane("start", str(steps_only), "--name", "y", "--coordinator", target)
    assert named.status == 0, named.err


async def test_start_watch_follows_the_saga_to_its_end(
    coordinator: Coordinator, shop: Shop, tmp_path: Path
) -> None:
    target = address(coordinator)
    ok, too_big = tmp_path / "ok.yaml", tmp_path / "big.yaml"
    ok.write_text(order_yaml(42))
    too_big.write_text(order_yaml(5000))

    completed = await sagaplane("start", str(ok), "--watch", "--coordinator", target)
    assert completed.status == 0, completed.err
    assert "saga_completed" in completed.out
    assert "-> completed after" in completed.out

    compensated = await sagaplane("start", str(too_big), "--watch", "--coordinator", target)
    assert compensated.status == 6  # it ended, but not completed
    assert "amount 5000 is over the limit" in compensated.out
    assert "-> compensated after" in compensated.out


# -- get, list ----------------------------------------------------------------------------


async def started_saga(target: str, tmp_path: Path, name: str = "order.place") -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ORDER_JSON | {"name": name}))
    saga: dict[str, Any] = (
        await sagaplane("start", str(path), "--json", "--coordinator", target)
    ).json()
    return str(saga["id"])


async def test_get_shows_a_saga_as_a_table_or_json(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    target = address(coordinator)
    saga_id = await started_saga(target, tmp_path)

    table = await sagaplane("get", saga_id, "--coordinator", target)
    assert table.status == 0
    assert f"saga      {saga_id}" in table.out
    assert "2  reserve  inventory.reserve  inventory.release  pending" in table.out
    assert "saga_started" not in table.out

    history = await sagaplane("get", saga_id, "--history", SAGAPLANE_COORDINATOR=target)
    assert "saga_started" in history.out and "step_dispatched" in history.out

    as_json = (
        await sagaplane("get", saga_id, "--json", "--history", "--coordinator", target)
    ).json()
    assert as_json["id"] == saga_id
    assert as_json["context"] == {"customer": "c-1"}
    assert as_json["steps"][0]["input"] == {"sku": "book", "qty": 2}  # integers stay integers
    assert [h["event"] for h in as_json["history"]] == ["saga_started", "step_dispatched"]


async def test_get_an_unknown_saga_is_status_4_and_no_coordinator_is_status_3(
    coordinator: Coordinator,
) -> None:
    unknown = await sagaplane(
        "get", "01JZ3C8V9X0M4S2K7Q5R6T1W8Y", "--coordinator", address(coordinator)
    )
    assert unknown.status == 4
    assert unknown.err.strip() == "sagaplane: error: no saga with id '01JZ3C8V9X0M4S2K7Q5R6T1W8Y'"
    assert (await sagaplane("get", "not-an-id", "--coordinator", address(coordinator))).status == 4

    unreachable = await sagaplane("get", "01JZ3C8V9X0M4S2K7Q5R6T1W8Y", "--coordinator", NOWHERE)
    assert unreachable.status == 3
    assert f"cannot reach the coordinator at {NOWHERE}" in unreachable.err
    assert "sagaplane serve" in unreachable.err
    assert "Traceback" not in unreachable.err


async def test_several_replicas_in_one_target(coordinator: Coordinator, tmp_path: Path) -> None:
    """A list of replicas: calls go to those that answer (here one of two); a list gRPC
    cannot resolve is a usage error that names it."""
    saga_id = await started_saga(address(coordinator), tmp_path)
    replicas = f"{NOWHERE},{address(coordinator)}"
    for _ in range(3):
        assert (await sagaplane("get", saga_id, "--coordinator", replicas)).status == 0
    assert (await sagaplane("get", saga_id, SAGAPLANE_COORDINATOR=replicas)).status == 0
    names = "a.internal:50051,b.internal:50051"
    refused = await sagaplane("get", saga_id, "--coordinator", names)
    assert refused.status == 2
    assert f"{names!r}: 'a.internal' is not an IP address" in refused.err
    assert "Traceback" not in refused.err
    nowhere = await sagaplane("get", saga_id, "--coordinator", f"{NOWHERE},127.0.0.1:2")
    assert nowhere.status == 3
    assert f"cannot reach the coordinator at {NOWHERE},127.0.0.1:2" in nowhere.err


async def test_a_flag_wins_over_the_environment(coordinator: Coordinator, tmp_path: Path) -> None:
    target = address(coordinator)
    saga_id = await started_saga(target, tmp_path)
    assert (await sagaplane("get", saga_id, SAGAPLANE_COORDINATOR=target)).status == 0
    assert (await sagaplane("get", saga_id, SAGAPLANE_COORDINATOR=NOWHERE)).status == 3
    wins = await sagaplane("get", saga_id, "--coordinator", target, SAGAPLANE_COORDINATOR=NOWHERE)
    assert wins.status == 0

    garbage = await sagaplane("get", saga_id, SAGAPLANE_TIMEOUT="soon")
    assert garbage.status == 2
    assert "SAGAPLANE_TIMEOUT='soon' is not a number" in garbage.err


async def test_list_shows_active_sagas_newest_first(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    target = address(coordinator)
    empty = await sagaplane("list", "--coordinator", target)
    assert (empty.status, empty.out.strip()) == (0, "no active sagas")

    older = await started_saga(target, tmp_path, "order.place")
    newer = await started_saga(target, tmp_path, "order.return")

    table = await sagaplane("list", "--coordinator", target)
    lines = table.out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "DONE", "AT", "STEP", "UPDATED"]
    assert [line.split()[0] for line in lines[1:]] == [newer, older]
    assert lines[1].split()[1:6] == ["order.return", "started", "0/3", "create", "(started)"]

    listed = (await sagaplane("list", "--json", "--coordinator", target)).json()
    assert [s["id"] for s in listed] == [newer, older]
    named = (
        await sagaplane("list", "--json", "--name", "order.place", "--coordinator", target)
    ).json()
    assert [s["id"] for s in named] == [older]

    limited = await sagaplane("list", "--limit", "1", "--coordinator", target)
    assert [line.split()[0] for line in limited.out.splitlines()[1:]] == [newer]
    assert "raise --limit" in limited.err

    stale = await sagaplane("list", "--stale-for", "1h", "--coordinator", target)
    assert stale.out.strip() == "no active sagas"

    for bad in (["--limit", "0"], ["--stale-for", "soon"]):
        result = await sagaplane("list", *bad, "--coordinator", target)
        assert result.status == 2, bad
    assert (await sagaplane("list", "--coordinator", NOWHERE)).status == 3


# -- compensate, watch -------------------------------------------------------------------


async def test_compensate_and_watch_a_saga_to_its_end(
    coordinator: Coordinator, shop: Shop, tmp_path: Path
) -> None:
    target = address(coordinator)
    saga_id = await started_saga(target, tmp_path)
    watched = await sagaplane("watch", saga_id, "--coordinator", target)
    assert watched.status == 0, watched.err
    assert watched.out.splitlines()[0] == f"saga {saga_id} (order.place)"
    events = [line.split()[1] for line in watched.out.splitlines() if line.startswith("    +")]
    assert events[0] == "saga_started" and events[-1] == "saga_completed"

    undone = await sagaplane(
        "compensate", saga_id, "--reason", "customer cancelled", "--watch", "--coordinator", target
    )
    assert undone.status == 0, undone.err
    assert "compensation_requested" in undone.out and "(customer cancelled)" in undone.out
    assert "-> compensated" in undone.out
    assert await shop.rows("orders", "SELECT status FROM shop_orders") == [("cancelled",)]

    final = await sagaplane("watch", saga_id, "--json", "--coordinator", target)
    assert final.status == 6  # watch hopes for completed
    saga = json.loads(final.out)  # --json: only the final saga
    assert saga["state"] == "SAGA_STATE_COMPENSATED"
    assert saga["history"][-1]["event"] == "saga_compensated"


async def test_compensate_and_watch_errors(coordinator: Coordinator, tmp_path: Path) -> None:
    target = address(coordinator)
    unknown = "01JZ3C8V9X0M4S2K7Q5R6T1W8Y"
    assert (await sagaplane("compensate", unknown, "--coordinator", target)).status == 4
    assert (await sagaplane("watch", unknown, "--coordinator", target)).status == 4
    assert (await sagaplane("compensate", unknown, "--coordinator", NOWHERE)).status == 3

    # No participant runs here: the saga cannot end, so watching gives up.
    saga_id = await started_saga(target, tmp_path)
    waited = await sagaplane("watch", saga_id, "--max-wait", "0.5", "--coordinator", target)
    assert waited.status == 7
    assert f"saga {saga_id} has not ended after 0.5s" in waited.err

    # Its command reached no queue (the relay tried it while the watch waited), so the
    # step is recorded as not run and nothing is left to undo.
    compensated = await sagaplane("compensate", saga_id, "--json", "--coordinator", target)
    assert compensated.json()["state"] == "SAGA_STATE_COMPENSATED"


async def test_watch_flags_without_watch_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "order.json"
    path.write_text(json.dumps(ORDER_JSON))
    started = await sagaplane("start", str(path), "--max-wait", "5", "--coordinator", NOWHERE)
    assert (started.status, started.err.strip()) == (
        2,
        "sagaplane: error: --max-wait only applies with --watch: add --watch, or leave it out",
    )
    both = await sagaplane(
        "compensate", "01JZ3C8V9X0M4S2K7Q5R6T1W8Y", "--max-wait", "5", "--interval", "1",
        "--coordinator", NOWHERE,
    )  # fmt: skip
    assert both.status == 2
    assert "--max-wait and --interval only apply with --watch" in both.err
    assert "Traceback" not in started.err + both.err


async def test_a_reader_that_goes_away_does_not_fail_the_command(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """`sagaplane list | head -1`: the pipe closes before (or while) the table is written."""
    target = address(coordinator)
    saga_id = await started_saga(target, tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    for args in (["list"], ["get", saga_id, "--history"], ["list", "--json"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: every write fails
        proc = await asyncio.create_subprocess_exec(
            SAGAPLANE, *args, "--coordinator", target,
            stdout=write, stderr=asyncio.subprocess.PIPE, env=clean,
        )  # fmt: skip
        os.close(write)
        _, err = await proc.communicate()
        assert (proc.returncode, err.decode()) == (0, ""), args


async def test_watch_waits_for_a_restarted_coordinator(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    coordinator = CoordinatorProcess(database_url, amqp_url)
    await coordinator.start()
    held, name = asyncio.Event(), unique_name("sagaplane_cli_held")
    await create_database(name)
    participant = Participant("held", amqp_url=amqp_url, database_url=server_url(name))

    @participant.step("held.do")
    async def do(ctx: StepContext) -> dict[str, Any]:
        await held.wait()
        return {"done": True}

    watch: asyncio.subprocess.Process | None = None
    try:
        async with participant:
            path = tmp_path / "held.yaml"
            path.write_text("name: held.saga\nsteps:\n  - {name: do, action: held.do}\n")
            started = await sagaplane(
                "start", str(path), "--json", "--coordinator", coordinator.address
            )
            saga_id = started.json()["id"]
            watch = await asyncio.create_subprocess_exec(
                SAGAPLANE, "watch", saga_id, "--coordinator", coordinator.address,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert watch.stdout is not None
            first = await asyncio.wait_for(watch.stdout.readline(), 30)
            assert first.decode().strip() == f"saga {saga_id} (held.saga)"

            await coordinator.kill()
            await asyncio.sleep(1.0)  # the watch notices while it is down
            await coordinator.start()
            held.set()
            out, err = await asyncio.wait_for(watch.communicate(), 60)
    finally:
        if watch is not None and watch.returncode is None:
            watch.kill()
        await coordinator.terminate()
        await drop_database(name)
    assert watch.returncode == 0, err.decode()
    assert "-> completed" in out.decode()
    assert out.decode().count("step_dispatched") == 1  # nothing shown twice
    notes = err.decode().splitlines()
    assert notes[0].startswith(f"sagaplane: lost the coordinator at {coordinator.address} (")
    assert notes[0].endswith("reconnecting until it is back")
    assert notes[1] == f"sagaplane: the coordinator at {coordinator.address} is back"
    assert "Traceback" not in err.decode()


# -- resolve ----------------------------------------------------------------------------


@pytest.fixture
async def stubborn(amqp_url: str) -> AsyncIterator[str]:
    """A participant whose compensation always fails: its sagas end compensation_failed."""
    name = unique_name("sagaplane_cli_stubborn")
    await create_database(name)
    participant = Participant("stubborn", amqp_url=amqp_url, database_url=server_url(name))

    @participant.step("stubborn.do")
    async def do(ctx: StepContext) -> dict[str, Any]:
        return {"done": True}

    @participant.compensation("stubborn.undo")
    async def undo(ctx: StepContext) -> None:
        raise NonRetryableError("cannot be undone automatically")

    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(participant)
            yield "stubborn"
    finally:
        await drop_database(name)


async def test_resolve_a_saga_whose_compensation_failed(
    coordinator: Coordinator, stubborn: str, tmp_path: Path
) -> None:
    target = address(coordinator)
    path = tmp_path / "stubborn.yaml"
    path.write_text(
        "name: stubborn.saga\nsteps:\n"
        "  - {name: do, action: stubborn.do, compensation: stubborn.undo}\n"
    )
    saga_id = (
        await sagaplane("start", str(path), "--json", "--watch", "--coordinator", target)
    ).json()["id"]
    failed = await sagaplane("compensate", saga_id, "--watch", "--coordinator", target)
    assert failed.status == 6  # it ended, but not compensated
    assert "-> compensation_failed" in failed.out

    listed = await sagaplane("list", "--coordinator", target)
    assert f"{saga_id}  stubborn.saga  compensation_failed" in listed.out

    refused = await sagaplane("compensate", saga_id, "--coordinator", target)
    assert refused.status == 5
    assert refused.err.strip().splitlines() == [
        f"sagaplane: error: refused: saga {saga_id} is compensation_failed: a compensation "
        "failed (step 'do') and needs a person. Once its cause is fixed, retry it with",
        f"  sagaplane resolve {saga_id} --retry --reason WHY",
        "or, if it was undone by hand, go on with the older steps' compensations with",
        f"  sagaplane resolve {saga_id} --mark-compensated --reason WHY",
    ]
    assert "ResolveCompensation" not in refused.err and "Traceback" not in refused.err

    no_reason = await sagaplane("resolve", saga_id, "--mark-compensated", "--coordinator", target)
    assert no_reason.status == 2 and "--reason" in no_reason.err

    resolved = await sagaplane(
        "resolve", saga_id, "--mark-compensated", "--reason", "refunded by hand (ops-42)",
        "--json", "--coordinator", target,
    )  # fmt: skip
    assert resolved.json()["state"] == "SAGA_STATE_COMPENSATED"
    history = (
        await sagaplane("get", saga_id, "--history", "--json", "--coordinator", target)
    ).json()
    assert "refunded by hand (ops-42)" in [h.get("reason") for h in history["history"]]

    again = await sagaplane("resolve", saga_id, "--retry", "--reason", "x", "--coordinator", target)
    assert again.status == 5
    assert (
        await sagaplane("resolve", "01JZ3C8V9X0M4S2K7Q5R6T1W8Y", "--retry", "--reason", "x",
                        "--coordinator", target)
    ).status == 4  # fmt: skip


# -- health ------------------------------------------------------------------------------


async def test_health(coordinator: Coordinator) -> None:
    serving = await sagaplane("health", "--coordinator", address(coordinator))
    assert (serving.status, serving.out.strip()) == (0, "SERVING")
    as_json = await sagaplane("health", "--json", "--coordinator", address(coordinator))
    assert as_json.json() == {"status": "SERVING"}
    down = await sagaplane("health", "--coordinator", NOWHERE)
    assert down.status == 3
    assert "cannot reach the coordinator" in down.err
