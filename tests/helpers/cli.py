"""Running the ``sagaplane`` command as a user runs it (:func:`sagaplane`, the console
script in a process of its own), or in-process, as a shell would, for tests that watch
what the coordinator sees of it (:func:`exit_status`; run it in a thread: it has its
own event loop)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.cli import main

SAGAPLANE = str(Path(sys.executable).parent / "sagaplane")


@dataclass
class Result:
    """What one run of the command printed, and its exit status."""

    status: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.status == 0, self.err
        return json.loads(self.out)


async def sagaplane(*args: str, stdin: str | None = None, **env: str) -> Result:
    """Run the console script with ``args``, with no SAGAPLANE_* setting but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAPLANE_")}
    proc = await asyncio.create_subprocess_exec(
        SAGAPLANE,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean | env,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def exit_status(argv: list[str]) -> int | str | None:
    """``sagaplane *argv``'s exit status (its output goes to the captured stdout/stderr)."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return None
