"""The one backoff helper: how long to wait after consecutive failures of the same thing.

Every loop of Sagaplane that waits for a service to come back (the coordinator's reply
consumer and timer loop, a participant holding a command while its database is away,
the outbox relay and its LISTEN connection) calls :func:`delay`. It doubles from
``initial`` up to ``maximum`` and never overflows, however long the outage: a copy of
``0.1 * 2**failures`` without a cap raises ``OverflowError`` after 1,024 failures and
takes its loop down with it. The wait is jittered (between half and all of it), so
that replicas failing together do not retry together.
"""

from __future__ import annotations

import random

__all__ = ["delay"]

_MAX_EXPONENT = 64
"""Past it, 2**n times any sane ``initial`` is far above any maximum."""


def delay(
    failures: int, *, initial: float = 0.1, maximum: float = 5.0, jitter: bool = True
) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 for the first).

    ``initial * 2**failures``, capped at ``maximum``; with ``jitter`` a random part of it
    between one half and all.
    """
    exponent = min(max(failures, 0), _MAX_EXPONENT)
    wait = min(maximum, initial * 2.0**exponent)
    return wait * random.uniform(0.5, 1.0) if jitter else wait
