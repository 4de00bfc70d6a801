"""Running the ``sagaplane`` command in-process, as a shell would, for tests that
watch what the coordinator sees of it (run it in a thread: it has its own event loop)."""

from __future__ import annotations

from coordinator.cli import main


def exit_status(argv: list[str]) -> int | str | None:
    """``sagaplane *argv``'s exit status (its output goes to the captured stdout/stderr)."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return None
