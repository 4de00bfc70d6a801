"""Fixtures of the fault suite, and the totals table printed at the end of the session.

The table is also written to ``tests/fault/.last-totals.txt`` (ignored by git), with
the command that produced it, for pasting into an issue note.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from _pytest.terminal import TerminalReporter

from fault.harness import TOTALS, Rig, totals_table
from fault.schema import SERVICES, TABLES
from fault.services import ensure_all_running_sync
from helpers.database import create_database, drop_database, server_url, unique_name

TOTALS_FILE = Path(__file__).parent / ".last-totals.txt"
RESTARTS_MODULE = Path(__file__).parent / "test_service_restarts.py"

_SESSION_START = time.monotonic()


@pytest.fixture
async def service_urls() -> AsyncIterator[dict[str, str]]:
    """One fresh database per fault service, with the suite's tables."""
    names = {service: unique_name(f"sagaplane_fault_{service}") for service in SERVICES}
    try:
        for name in names.values():
            await create_database(name)
            async with await psycopg.AsyncConnection.connect(
                server_url(name), autocommit=True
            ) as conn:
                await conn.execute(TABLES.encode())
        yield {service: server_url(name) for service, name in names.items()}
    finally:
        for name in names.values():
            await drop_database(name)


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest,
    database_url: str,
    amqp_url: str,
    service_urls: dict[str, str],
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """A coordinator process (not yet started) and the databases; processes stopped after."""
    fault = request.node.name.removeprefix("test_")
    rig = Rig(
        fault=fault,
        database_url=database_url,
        amqp_url=amqp_url,
        service_urls=service_urls,
        logs=tmp_path,
    )
    try:
        yield rig
    finally:
        await rig.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The restart faults disturb whatever else uses the machine's PostgreSQL and
    # RabbitMQ: run them after everything else of the session.
    restarts = [i for i in items if i.path == RESTARTS_MODULE]
    if restarts:
        items[:] = [i for i in items if i not in restarts] + restarts


def pytest_sessionfinish() -> None:
    # Last line of defence: a restart fault cut short (a timeout, Ctrl-C) must not leave
    # the machine's PostgreSQL or RabbitMQ down for everyone else.
    ensure_all_running_sync()


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if not TOTALS:
        return
    lines = totals_table(TOTALS)
    failing = [t for t in TOTALS if not t.ok]
    command = shlex.join(["pytest", *sys.argv[1:]])
    elapsed = time.monotonic() - _SESSION_START
    header = [
        f"Sagaplane fault suite, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, session {elapsed:.0f}s",
        f"$ {command}",
        "",
    ]
    footer = ["", "Every count but started/terminal must be 0."]
    for t in failing:
        footer += [f"{t.fault}: {d}" for d in t.details]
    terminalreporter.write_sep("=", "fault suite totals")
    for line in [*header, *lines, *footer]:
        terminalreporter.write_line(line)
    TOTALS_FILE.write_text("\n".join([*header, *lines, *footer]) + "\n")
    terminalreporter.write_line(f"(written to {TOTALS_FILE})")
