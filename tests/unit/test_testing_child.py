"""sagaplane.testing.Child: output over a span of time, and the signal that stops it."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from sagaplane.testing import Child

# Prints its argument lines, says "waiting", then waits to be signalled; on SIGINT it
# prints "interrupted" and exits 3 (as py-spy writes its results on SIGINT).
_SCRIPT = """
import signal, sys, time
def on_int(*_):
    print("interrupted", flush=True)
    sys.exit(3)
signal.signal(signal.SIGINT, on_int)
for line in sys.argv[1:]:
    print(line, flush=True)
print("waiting", flush=True)
time.sleep(60)
"""


def _talker(tmp_path: Path, *lines: str) -> list[str]:
    script = tmp_path / "talker.py"
    script.write_text(_SCRIPT)
    return [sys.executable, str(script), *lines]


async def _until_said(child: Child, line: str) -> None:
    for _ in range(500):
        if line in child.tail(100).splitlines():
            return
        child.check_alive()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{child.name} never said {line!r}: {child.tail()}")


@pytest.mark.parametrize("logged", [True, False], ids=["log file", "in memory"])
async def test_output_since_a_mark_spans_restarts(tmp_path: Path, logged: bool) -> None:
    log = tmp_path / "child.log" if logged else None
    child = Child("talker", _talker(tmp_path, "one"), log_path=log)
    await child.start()
    await _until_said(child, "waiting")
    mark = child.output_mark()
    assert child.output_since(mark) == []
    await child.stop(grace=5)
    child.argv[-1] = "two"
    await child.start()
    await _until_said(child, "two")
    await child.stop(grace=5)
    since = [line for line in child.output_since(mark) if not line.startswith("====")]
    assert since == ["two", "waiting"]
    assert "one" in child.output_since(0)


async def test_stop_with_another_signal(tmp_path: Path) -> None:
    child = Child("talker", _talker(tmp_path), log_path=tmp_path / "child.log")
    await child.start()
    await _until_said(child, "waiting")
    assert await child.stop(grace=5, sig=signal.SIGINT) == 3
    assert child.tail(1) == "interrupted"
    assert child.kills == 0
