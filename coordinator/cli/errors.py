"""Exit statuses, and the one error the commands raise to end with one."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What the ``sagaplane`` process exit status means (also in ``sagaplane --help``)."""

    OK = 0
    ERROR = 1
    """An unexpected error (for the demo: it did not end as expected)."""
    USAGE = 2
    """Bad flags or input: argparse's own code, an unreadable saga file, INVALID_ARGUMENT."""
    UNAVAILABLE = 3
    """The coordinator (for serve, migrate, the demo: PostgreSQL or RabbitMQ) cannot be reached."""
    NOT_FOUND = 4
    """No saga has this id."""
    REFUSED = 5
    """FAILED_PRECONDITION (an illegal transition) or ALREADY_EXISTS (idempotency key reuse)."""
    NOT_AS_HOPED = 6
    """A watched saga ended, but not completed (for compensate: not compensated)."""
    TIMEOUT = 7
    """``--max-wait`` passed before the saga ended."""
    DENIED = 8
    """UNAUTHENTICATED (no token, or an unknown one) or PERMISSION_DENIED (the token's
    role does not allow the call)."""


class CliError(Exception):
    """A command failed in a way the user can act on: message to stderr, then exit."""

    def __init__(self, message: str, code: ExitCode = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.message = message
        """One or a few lines for the user, without a traceback."""
        self.code = code
        """The process exit status."""
