"""``sagaplane import`` as a user runs it: a real subprocess against a real coordinator,
PostgreSQL and RabbitMQ; interrupted with SIGINT and run again; malformed rows."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest

from coordinator.app import Coordinator
from sagaplane import topology

SAGAPLANE = str(Path(sys.executable).parent / "sagaplane")

TEMPLATE = """\
name: order.import
idempotency_key: ${row.key}
context: {customer: "${row.customer}", source: "import of ${row.customer}"}
steps:
  - name: create
    action: ${row.action}
    compensation: orders.delete
    input: {order_id: "${row.order_id}", qty: "${row.qty:int}", gift: "${row.gift:bool}"}
  - name: charge
    action: payment.charge
    # The engine's references are not the template's: they reach the coordinator as written.
    input: {order: "${steps.create.output.order_id}", customer: "${context.customer}",
            amount: "${row.amount:number}"}
"""
HEADER = "order_id,customer,qty,gift,amount,action,key"


def csv_row(n: int, **changes: str) -> str:
    fields = {
        "order_id": f"o-{n}",
        "customer": f"c-{n % 97}",
        "qty": str(n % 5 + 1),
        "gift": "yes" if n % 2 else "no",
        "amount": f"{n % 100}.5",
        "action": "orders.create",
        "key": "",  # empty: the import derives the key
    } | changes
    return ",".join(fields.values())


def write_csv(path: Path, rows: int, changes: dict[int, dict[str, str]] | None = None) -> None:
    """``rows`` data rows; row n is on line n + 1."""
    lines = [HEADER]
    for n in range(1, rows + 1):
        lines.append(csv_row(n, **(changes or {}).get(n, {})))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "order.yaml"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture
async def sink(coordinator: Coordinator, amqp_url: str) -> AsyncIterator[None]:
    """A queue for every command, so that the relay's publishes are routed (no
    participant runs here); it goes with the test's vhost."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("commands-sink", durable=False)
        await queue.bind(topology.COMMANDS_EXCHANGE, "#")
        yield


async def sagaplane(
    *args: str | Path, stdin: int | None = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    return await asyncio.create_subprocess_exec(
        SAGAPLANE,
        *map(str, args),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean,
    )


async def run(*args: str | Path) -> tuple[int, str, str]:
    proc = await sagaplane(*args)
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def query(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(sql.encode())
        return await cur.fetchall()


def where(coordinator: Coordinator) -> tuple[str, str]:
    return ("--coordinator", f"127.0.0.1:{coordinator.port}")


async def test_a_ten_thousand_row_csv_through_a_template(
    coordinator: Coordinator, database_url: str, sink: None, template: Path, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    write_csv(orders, 10_000, {7: {"key": "order-seven"}})
    code, out, err = await run(
        "import", "--template", template, "--csv", orders, "--json", *where(coordinator)
    )

    assert code == 0, err
    summary = json.loads(out)
    assert summary["rows"] == 10_000 and summary["calls"] == 20
    assert (summary["started"], summary["replayed"], summary["failed"]) == (10_000, 0, [])
    assert summary["sagas_per_second"] > 0
    # Not a terminal: a plain line per chunk on stderr.
    assert "lines 2-501: 500 started, 0 replayed (500/10000)" in err
    [(count, keys)] = await query(
        database_url, "SELECT count(*), count(DISTINCT idempotency_key) FROM sagaplane_sagas"
    )
    assert (count, keys) == (10_000, 10_000)

    [(context, key, create, charge)] = await query(
        database_url,
        "SELECT s.context, s.idempotency_key, c.input, p.input FROM sagaplane_sagas s"
        " JOIN sagaplane_steps c ON c.saga_id = s.id AND c.position = 0"
        " JOIN sagaplane_steps p ON p.saga_id = s.id AND p.position = 1"
        " WHERE s.context->>'source' = 'import of c-7'"
        " AND c.input->>'order_id' = 'o-7'",
    )
    assert context == {"customer": "c-7", "source": "import of c-7"}
    assert key == "order-seven"  # the row's own key wins
    assert create == {"order_id": "o-7", "qty": 3, "gift": True}
    assert charge == {
        "order": "${steps.create.output.order_id}",
        "customer": "${context.customer}",
        "amount": 7.5,
    }
    [(derived,)] = await query(
        database_url,
        "SELECT s.idempotency_key FROM sagaplane_sagas s JOIN sagaplane_steps c"
        " ON c.saga_id = s.id AND c.position = 0 WHERE c.input->>'order_id' = 'o-8'",
    )
    assert derived == f"import:{summary['import_id']}:9"  # row 8 is on line 9


async def test_interrupted_half_way_and_run_again_starts_each_row_once(
    coordinator: Coordinator, database_url: str, sink: None, template: Path, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    write_csv(orders, 10_000)
    command = ("import", "--template", template, "--csv", orders, "--json", *where(coordinator))

    proc = await sagaplane(*command)
    deadline = time.monotonic() + 120
    while True:
        [(count,)] = await query(database_url, "SELECT count(*) FROM sagaplane_sagas")
        if count >= 4_000:
            break
        assert proc.returncode is None, "the import ended before it was interrupted"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, err.decode()
    first = json.loads(out)
    assert first["interrupted"] is True
    assert "run the same import again" in " ".join(first["notes"])
    [(before,)] = await query(database_url, "SELECT count(*) FROM sagaplane_sagas")
    assert 4_000 <= before < 10_000

    code, out, err = await run(*command)
    assert code == 0, err
    second = json.loads(out)
    assert second["replayed"] == before
    assert second["started"] == 10_000 - before
    [(count, orders_seen, keys)] = await query(
        database_url,
        "SELECT count(*), count(DISTINCT st.input->>'order_id'), count(DISTINCT idempotency_key)"
        " FROM sagaplane_sagas s JOIN sagaplane_steps st ON st.saga_id = s.id AND st.position = 0",
    )
    assert (count, orders_seen, keys) == (10_000, 10_000, 10_000)


async def test_malformed_rows_are_named_by_line_and_their_chunks_write_nothing(
    coordinator: Coordinator, database_url: str, sink: None, template: Path, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    write_csv(
        orders,
        2_000,
        {
            699: {"qty": "many"},  # line 700: not an integer (found before sending)
            1499: {"action": "orders.*"},  # line 1500: the coordinator refuses the action
        },
    )
    lines = orders.read_text(encoding="utf-8").splitlines()
    lines[1899] = "o-1899,c-1"  # line 1900: two fields
    orders.write_text("\n".join(lines) + "\n", encoding="utf-8")

    code, out, err = await run(
        "import", "--template", template, "--csv", orders, "--chunk", "500", *where(coordinator)
    )

    assert code == 2, err
    assert "line 700: column qty: 'many' is not an integer" in out
    assert "line 1500: steps[0].action: must be words of letters" in out
    assert "line 1900: has 2 fields, the header 7" in out
    assert "  started      500" in out and "  failed       3" in out
    assert "  not started  1497 (in a chunk with a failed row)" in out
    # Chunks: lines 2-501 started; 502-1001, 1002-1501 and 1502-2001 wrote nothing.
    found = await query(
        database_url,
        "SELECT min((st.input->>'order_id')::text), count(*) FROM sagaplane_steps st"
        " WHERE st.position = 0",
    )
    assert found[0][1] == 500
    numbers = await query(
        database_url,
        "SELECT substr(st.input->>'order_id', 3)::int AS n FROM sagaplane_steps st"
        " WHERE st.position = 0 ORDER BY n",
    )
    assert [n for (n,) in numbers] == list(range(1, 501))


async def test_json_lines_and_yaml_lists(
    coordinator: Coordinator, database_url: str, sink: None, tmp_path: Path
) -> None:
    saga = {"name": "n", "steps": [{"name": "s", "action": "a.b"}]}
    jsonl = tmp_path / "sagas.jsonl"
    jsonl.write_text(
        json.dumps(saga | {"context": {"row": 1}})
        + "\n\n"  # a blank line is skipped
        + json.dumps(saga | {"idempotency_key": "mine"})
        + "\n",
        encoding="utf-8",
    )
    code, out, err = await run("import", jsonl, "--json", *where(coordinator))
    assert code == 0, err
    assert json.loads(out)["started"] == 2

    yaml_list = tmp_path / "sagas.yaml"
    yaml_list.write_text(
        "- {name: n, steps: [{name: s, action: a.b}]}\n- {name: n, steps: [{name: s}]}\n",
        encoding="utf-8",
    )
    code, out, err = await run("import", yaml_list, *where(coordinator))
    assert code == 2
    assert "item 2: steps[0].action: is required" in out

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(saga) + "\n{not json\n", encoding="utf-8")
    code, out, err = await run("import", broken, *where(coordinator))
    assert code == 2
    assert "line 2: is not JSON" in out

    keys = sorted(
        k for (k,) in await query(database_url, "SELECT idempotency_key FROM sagaplane_sagas")
    )
    assert len(keys) == 2 and keys[0].startswith("import:") and keys[1] == "mine"


async def test_a_template_naming_a_missing_column_stops_before_anything_is_sent(
    coordinator: Coordinator, database_url: str, tmp_path: Path
) -> None:
    template = tmp_path / "t.yaml"
    template.write_text("name: n\nsteps: [{name: s, action: '${row.acton}'}]\n", "utf-8")
    orders = tmp_path / "o.csv"
    orders.write_text("action\na.b\n", encoding="utf-8")
    code, _, err = await run("import", orders, "--template", template, *where(coordinator))
    assert code == 2
    assert "the template names columns" in err and "acton" in err
    assert await query(database_url, "SELECT count(*) FROM sagaplane_sagas") == [(0,)]


async def test_a_terminal_gets_a_progress_bar(
    coordinator: Coordinator, sink: None, template: Path, tmp_path: Path
) -> None:
    orders = tmp_path / "orders.csv"
    write_csv(orders, 10)
    primary, secondary = pty.openpty()  # stderr on a terminal, as a person runs it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    try:
        proc = await asyncio.create_subprocess_exec(
            SAGAPLANE, "import", str(orders), "--template", str(template), *where(coordinator),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=secondary,
            env=clean | {"COLUMNS": "100", "TERM": "xterm"},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert proc.returncode == 0
    assert "importing" in shown.decode() and "10/10" in shown.decode()
    assert "  started      10" in out.decode()
