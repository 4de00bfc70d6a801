"""Writing for a reader that may go away: ``sagaplane list | head -1``.

When the reader closes the pipe, the next write raises BrokenPipeError. That is no
failure of the command: :func:`say` then points stdout at ``/dev/null`` and carries on,
so that the command ends with its own exit status (and its cleanup runs). The CLI and
the demo print through it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["say", "silence_stdout"]


def say(text: str = "") -> None:
    """Print one line to stdout and flush it (output is watched as it happens); once
    the reader has gone, print nothing more, quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Point stdout at ``/dev/null``: what is still buffered, and whatever is printed
    later, goes nowhere (so the interpreter's last flush cannot fail either)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
