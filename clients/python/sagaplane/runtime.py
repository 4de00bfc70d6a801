"""Running a Sagaplane process's event loop: uvloop by default, asyncio on request.

Measured with ``python -m bench`` (bench/README.md): most of a coordinator's or a
participant's CPU goes to the event loop and to psycopg's per-query waits (one
add_reader/remove_reader per round trip), which uvloop does in C.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

__all__ = ["EVENT_LOOPS", "EventLoop", "log_crash", "run"]

T = TypeVar("T")

EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoop)
"""The event loops :func:`run` knows, the default first."""


def run(main: Coroutine[Any, Any, T], *, event_loop: str = "uvloop") -> T:
    """Run ``main`` to completion on a new event loop of the given kind (like asyncio.run).

    ``uvloop`` falls back to asyncio's own loop where uvloop is not installed (Windows).
    """
    if event_loop not in EVENT_LOOPS:
        main.close()
        raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, not {event_loop!r}")
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def log_crash(logger: logging.Logger, what: str) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback for a background task: log it CRITICAL, with its traceback, if it
    ended with an exception (``"<what> died"``). Cancellation and a normal end are quiet.

    A task that dies must be loud: whoever supervises it (``coordinator.app.serve``, a
    caller's own loop) then stops the process rather than leave it half alive.
    """

    def report(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.critical("%s died", what, exc_info=exc)

    return report
