"""The outbox relay's settings an operator tunes, with their environment variables.

:class:`~sagaplane.relay.OutboxRelay` takes them as arguments; a
:class:`~sagaplane.participant.Participant` and ``sagaplane relay`` read them from the
environment with :meth:`RelaySettings.from_env`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RelaySettings"]


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    """The relay's settings an operator tunes, each with an environment variable
    (:meth:`from_env`) and a documented default."""

    batch_size: int = 500
    """Rows claimed and published per cycle (``SAGAPLANE_OUTBOX_BATCH_SIZE``)."""
    poll_interval: float = 1.0
    """Seconds an idle relay waits when no NOTIFY comes (``SAGAPLANE_OUTBOX_POLL_INTERVAL``)."""
    max_attempts: int = 20
    """Failed publishes before a row is parked (``SAGAPLANE_OUTBOX_MAX_ATTEMPTS``)."""
    max_age: float | None = None
    """Seconds after which an unpublished row expires; None or 0: never
    (``SAGAPLANE_OUTBOX_MAX_AGE``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RelaySettings:
        """The settings ``env`` gives (the defaults for what it does not); ValueError
        naming the variable for a value that is not a number."""
        d = cls()

        def number(name: str, default: float, kind: type[float] | type[int]) -> Any:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        max_age = number("SAGAPLANE_OUTBOX_MAX_AGE", 0.0, float)
        return cls(
            batch_size=number("SAGAPLANE_OUTBOX_BATCH_SIZE", d.batch_size, int),
            poll_interval=number("SAGAPLANE_OUTBOX_POLL_INTERVAL", d.poll_interval, float),
            max_attempts=number("SAGAPLANE_OUTBOX_MAX_ATTEMPTS", d.max_attempts, int),
            max_age=max_age or None,
        )
