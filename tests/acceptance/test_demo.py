"""The demo: the README's command as written, an interrupted run, and the docker compose
services (run here, without Docker, on the local PostgreSQL and RabbitMQ)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml
from test_readme import ROOT, fresh_shell_env, quick_start_commands

from coordinator.cli import build_parser
from examples.shop.__main__ import build_parser as build_shop_parser
from examples.shop.services import SERVICES
from helpers.broker import rabbitmqctl
from helpers.database import drop_database, server_url, unique_name
from helpers.processes import free_port
from sagaplane.testing import Child

VENV_BIN = Path(sys.executable).parent


def session_processes(sid: int) -> list[str]:
    """Every live process of session ``sid``, as ``pid command``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        # The command may contain spaces and parentheses; the fields after it do not.
        fields = text[text.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            found.append(f"{stat.parent.name} {text[text.index('(') : text.rindex(')') + 1]}")
    return found


async def leftovers(run_id: str) -> tuple[list[str], list[str]]:
    """The databases and vhosts a demo run left behind."""
    async with await psycopg.AsyncConnection.connect(server_url("postgres")) as conn:
        cur = await conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"%demo_{run_id}%",)
        )
        databases = [row[0] for row in await cur.fetchall()]
    out = await rabbitmqctl("list_vhosts")
    vhosts = [v for v in out.split() if run_id in v]
    return databases, vhosts


def check_demo_output(out: str) -> None:
    """One saga completed, one compensated, told as it happened, and checked."""
    assert out.count("\n  -> completed after ") == 1, out
    assert out.count("\n  -> compensated after ") == 1, out
    # Both sagas: reserve and validate_address dispatched together, when create completed.
    side_by_side = re.findall(
        r"\+([\d.]+)s\s+step_completed\s+create\s*\n\s+\+\1s\s+step_dispatched\s+reserve\s*\n"
        r"\s+\+\1s\s+step_dispatched\s+validate_address ",
        out,
    )
    assert len(side_by_side) == 2, out
    # The charge got the order id create returned, a number, by reference.
    assert re.search(
        r"step_dispatched\s+charge\s+\(input: \{\"amount\":42,\"order_id\":\d+\}\)", out
    )
    assert re.search(r"step_dispatched\s+gift_wrap\s+\(input: \{\"order_id\":\d+\}\)", out)
    assert re.search(r"step_skipped\s+gift_wrap\s+\(when 'context.gift == true' is false\)", out)
    assert re.search(r"step_failed\s+charge\s+\(NonRetryableError: amount 5000", out)
    assert re.search(r"step_compensated\s+reserve.*\n.*\n.*step_compensated\s+create", out)
    assert "\nFinal state and history\n" in out
    assert "state     completed" in out and "state     compensated" in out
    assert re.search(r"orders\s+shop_orders\s+created\s+cancelled", out)
    assert re.search(r"fulfillment\s+shop_addresses\s+valid\s+valid", out)
    assert re.search(r"fulfillment\s+shop_gift_wraps\s+wrapped\s+\(no row\)", out)
    assert re.search(r"payment\s+shop_payments\s+charged\s+\(no row\)", out)
    # The domain events, each consumed once: both orders were created, one was charged.
    events = out[out.index("\nDomain events (CloudEvents") :]
    assert re.search(r"saga 1\s+order\.created\s+order \d+ received: 1 x book", events)
    assert re.search(r"saga 1\s+payment\.charged\s+payment of 42\.0 taken for order \d+", events)
    assert re.search(r"saga 2\s+order\.created\s+order \d+ received", events)
    assert not re.search(r"saga 2\s+payment\.charged", events)
    assert events.count("order.created") == 2 and events.count("payment.charged") == 1
    assert re.search(r"Demo OK in [\d.]+s: saga \w{26} completed, saga \w{26} compensated\.", out)


async def test_the_readme_demo_command_runs_the_demo_end_to_end() -> None:
    command = quick_start_commands()[0]
    started = time.monotonic()
    # A new session, to find every process the demo started, even orphaned ones.
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=ROOT, env=fresh_shell_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        async with asyncio.timeout(240):
            out_bytes, err_bytes = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    took = time.monotonic() - started
    out, err = out_bytes.decode(), err_bytes.decode()
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{out}\n{err}"
    check_demo_output(out)
    for step in ("created RabbitMQ vhost", "created databases", "migrated", "is SERVING"):
        assert step in out
    assert re.search(
        r"stopped coordinator \(exit 0\), orders \(exit 0\), inventory \(exit 0\), "
        r"fulfillment \(exit 0\), payment \(exit 0\), notifications \(exit 0\)",
        out,
    )
    assert session_processes(proc.pid) == []
    run_id = re.search(r"Sagaplane demo \(run (\w+)\)", out)
    assert run_id is not None
    assert await leftovers(run_id.group(1)) == ([], [])
    print(f"{command}: {took:.1f}s")


async def test_an_interrupted_demo_stops_its_processes_and_cleans_up() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.shop", "demo", cwd=ROOT, env=fresh_shell_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    try:
        async with asyncio.timeout(120):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo ended before its processes were ready:\n" + "".join(seen)
                seen.append(line)
                if "are consuming" in line:
                    break
            assert len(session_processes(proc.pid)) >= 5  # the demo and its four children
            proc.send_signal(signal.SIGTERM)
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 130
    assert "interrupted; everything started was stopped" in err.decode()
    assert session_processes(proc.pid) == []
    run_id = re.search(r"\(run (\w+)\)", "".join(seen))
    assert run_id is not None
    assert await leftovers(run_id.group(1)) == ([], [])


# -- docker compose ------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES_OF_COMPOSE: dict[str, dict[str, Any]] = COMPOSE["services"]


def test_the_compose_file_and_the_dockerfile_agree_with_the_code() -> None:
    setup = SERVICES_OF_COMPOSE["setup"]["command"]
    base = setup[setup.index("--database-url") + 1]
    parser = build_parser(env={})
    shop_parser = build_shop_parser()
    for name, service in SERVICES_OF_COMPOSE.items():
        command = service.get("command")
        if command and command[0] == "sagaplane":
            parser.parse_args(command[1:])  # every flag exists (exits 2 otherwise)
        if command and command[:3] == ["python", "-m", "examples.shop"]:
            shop_parser.parse_args(command[3:])
        if command and command[:3] == ["python", "-m", "examples.shop"] and command[3] != "demo":
            assert command[3] == name
            assert command[command.index("--database-url") + 1] == f"{base}_{name}"
    assert {s for s in SERVICES_OF_COMPOSE if s in SERVICES} == set(SERVICES)
    coordinator_env = SERVICES_OF_COMPOSE["coordinator"]["environment"]
    assert coordinator_env["SAGAPLANE_DATABASE_URL"] == base
    demo = SERVICES_OF_COMPOSE["demo"]["command"]
    assert demo[demo.index("--database-url") + 1] == base
    assert demo[demo.index("--coordinator") + 1] == "coordinator:50051"
    health = SERVICES_OF_COMPOSE["coordinator"]["healthcheck"]["test"]
    parser.parse_args(health[2:])

    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
            assert path not in ignored, f"Dockerfile copies {path}, which .dockerignore drops"


async def test_the_compose_services_run_the_same_demo(amqp_url: str) -> None:
    """Each compose service's command as written, but with this machine's addresses."""
    name = unique_name("sagaplane_compose")
    port = free_port()
    swaps = {
        "postgresql://postgres@postgres:5432/sagaplane": server_url(name),
        "0.0.0.0:50051": f"127.0.0.1:{port}",
        "0.0.0.0:9464": f"127.0.0.1:{free_port()}",  # the coordinator's metrics
        "127.0.0.1:50051": f"127.0.0.1:{port}",
        "coordinator:50051": f"127.0.0.1:{port}",
        "0.0.0.0:8080": f"127.0.0.1:{free_port()}",  # the web page
        "sagaplane": str(VENV_BIN / "sagaplane"),
        "python": sys.executable,
    }

    def local(value: str) -> str:
        for compose_value, here in swaps.items():
            if value == compose_value or value.startswith(compose_value + "_"):
                return here + value[len(compose_value) :]
        return value

    def command(service: str) -> list[str]:
        return [local(arg) for arg in SERVICES_OF_COMPOSE[service]["command"]]

    env = fresh_shell_env(PYTHONPATH=str(ROOT))  # as the Dockerfile sets it
    for key, value in SERVICES_OF_COMPOSE["coordinator"]["environment"].items():
        env[key] = amqp_url if key == "SAGAPLANE_AMQP_URL" else local(value)

    def run(service: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command(service), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    running: list[Child] = []
    try:
        setup = await asyncio.to_thread(run, "setup")
        assert setup.returncode == 0, setup.stderr
        for service in ("coordinator", *SERVICES):
            child = Child(service, command(service), env=env, cwd=ROOT)
            await child.start()
            running.append(child)
        demo = await asyncio.to_thread(run, "demo")
        assert demo.returncode == 0, demo.stdout + demo.stderr
        check_demo_output(demo.stdout)

        # The coordinator's health check, as compose runs it.
        check = SERVICES_OF_COMPOSE["coordinator"]["healthcheck"]["test"][1:]
        healthy = await asyncio.to_thread(
            subprocess.run, [local(a) for a in check], env=env, capture_output=True, timeout=30
        )
        assert healthy.returncode == 0, shlex.join(check)
    finally:
        statuses = await asyncio.gather(*(child.stop() for child in running))
        for db in (name, *(f"{name}_{s}" for s in SERVICES)):
            await drop_database(db)
    assert statuses == [0] * len(running), [c.tail() for c in running]


@dataclass
class Result:
    status: int
    out: str
    err: str


async def shop_demo(*args: str, **env: str) -> Result:
    """``python -m examples.shop demo args``, with no SAGAPLANE_* setting but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.shop", "demo", *args, cwd=ROOT, env=clean | env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


NOWHERE = "127.0.0.1:1"  # nothing listens there: connections are refused at once


# -- errors and --setup-only ------------------------------------------------------------


async def test_demo_errors() -> None:
    both = await shop_demo("--setup-only", "--attach")
    assert both.status == 2
    assert "not allowed with argument" in both.err

    no_pg = await shop_demo("--database-url", "postgresql://postgres@127.0.0.1:1/demo")
    assert no_pg.status == 3
    assert "cannot connect to PostgreSQL" in no_pg.err

    no_mq = await shop_demo("--amqp-url", "amqp://guest:guest@127.0.0.1:1/")
    assert no_mq.status == 3
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/" in no_mq.err
    run_id = re.search(r"\(run (\w+)\)", no_mq.out)
    assert run_id is not None
    async with await psycopg.AsyncConnection.connect(server_url("postgres")) as conn:
        cur = await conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"%{run_id.group(1)}%",)
        )
        assert await cur.fetchall() == []  # it failed before creating anything

    nobody = await shop_demo("--attach", "--coordinator", NOWHERE, "--startup-timeout", "1")
    assert nobody.status == 3
    assert "not ready after 1s" in nobody.err


async def test_demo_setup_only_creates_what_is_missing_and_migrates() -> None:
    name = unique_name("sagaplane_cli_setup")
    url = server_url(name)
    try:
        first = await shop_demo("--setup-only", SAGAPLANE_DEMO_DATABASE_URL=url)
        assert first.status == 0, first.err
        for db in (name, *(f"{name}_{s}" for s in SERVICES)):
            assert f"database {db} created" in first.out
        assert "coordinator/0001_sagas" in first.out
        again = await shop_demo("--setup-only", "--database-url", url)
        assert again.status == 0
        assert f"database {name}_payment already exists" in again.out
        assert f"migrated {name}: up to date" in again.out
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT count(*) FROM sagaplane_sagas")
            assert await cur.fetchone() == (0,)
    finally:
        for db in (name, *(f"{name}_{s}" for s in SERVICES)):
            await drop_database(db)
