"""The users example's demo: the README's command as written, run end to end."""

from __future__ import annotations

import asyncio
import re

import psycopg
from test_readme import ROOT, commands, fresh_shell_env, marked

from helpers.broker import rabbitmqctl
from helpers.database import server_url


async def test_the_readme_users_demo_runs_every_scene_and_leaves_nothing() -> None:
    [command] = commands(marked("Writing a participant in Python", "runs the users example", "sh"))
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=ROOT, env=fresh_shell_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(180):
        out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out

    assert re.search(r"completed in [\d.]+s: .*'scores_updated': 10000", out), out
    assert "failed after" in out and "DeadlineExceeded: deadline exceeded after 2.0s" in out
    assert "users named bob: 0" in out
    assert "3 sagas completed" in out and "; 1200 users" in out
    assert "row 3: username is required; row 10: username 'ada' is already used" in out
    assert "compensated: NonRetryableError: partner globex refused chunk 100" in out
    assert "users of the chunk left: 0" in out
    assert re.search(r"Demo OK in [\d.]+s\.", out)

    # It removed what it created.
    run_id = re.search(r"created databases sagaplane_users_(\w+),", out)
    assert run_id, out
    async with await psycopg.AsyncConnection.connect(server_url("postgres")) as conn:
        cur = await conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"%{run_id[1]}%",)
        )
        assert await cur.fetchall() == []
    assert run_id[1] not in await rabbitmqctl("list_vhosts")
