"""``python -m bench.with_uvloop MODULE ARGS...``: run ``python -m MODULE ARGS...`` on
uvloop's event loop, without changing MODULE (the harness's ``--uvloop`` experiment)."""

from __future__ import annotations

import asyncio
import runpy
import sys

import uvloop


def main() -> None:
    """Entry point."""
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.with_uvloop MODULE [ARGS...]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    # asyncio.run() in MODULE then makes a uvloop loop.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
