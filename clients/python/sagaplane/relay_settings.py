"""The outbox relay's settings an operator tunes, with their environment variables.

:class:`~sagaplane.relay.OutboxRelay` takes them as arguments
(:meth:`~sagaplane.relay.OutboxRelay.from_settings`); a
:class:`~sagaplane.participant.Participant`, ``sagaplane relay`` and the coordinator
(``sagaplane serve``) read them from the environment with :meth:`RelaySettings.from_env`,
the two commands also from the flags named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RelaySettings"]


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    """The relay's settings an operator tunes, each with an environment variable
    (:meth:`from_env`), a flag of ``sagaplane serve`` and ``sagaplane relay``, and a
    documented default. ValueError, naming the setting, for a value out of range."""

    batch_size: int = 500
    """Rows claimed and published per cycle (``SAGAPLANE_OUTBOX_BATCH_SIZE``,
    ``--batch-size``); at least 1."""
    poll_interval: float = 1.0
    """Seconds an idle relay waits when no NOTIFY comes (``SAGAPLANE_OUTBOX_POLL_INTERVAL``,
    ``--poll-interval``); above 0."""
    max_attempts: int = 20
    """Failed publishes (by the row's own fault) before a row is parked
    (``SAGAPLANE_OUTBOX_MAX_ATTEMPTS``, ``--max-attempts``); at least 1."""
    max_age: float | None = None
    """Seconds after which an unpublished row expires; None: never
    (``SAGAPLANE_OUTBOX_MAX_AGE``, ``--max-age``, where 0 means never)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(_range("batch size", "BATCH_SIZE", "at least 1", self.batch_size))
        if not self.poll_interval > 0:
            raise ValueError(
                _range("poll interval", "POLL_INTERVAL", "above 0", self.poll_interval)
            )
        if self.max_attempts < 1:
            raise ValueError(
                _range("max attempts", "MAX_ATTEMPTS", "at least 1", self.max_attempts)
            )
        if self.max_age is not None and not self.max_age > 0:
            raise ValueError(_range("max age", "MAX_AGE", "above 0 (or never)", self.max_age))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RelaySettings:
        """The settings ``env`` gives (the defaults for what it does not); ValueError
        naming the variable for a value that is not a number or out of range."""
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


def _range(what: str, variable: str, wanted: str, value: object) -> str:
    # Named as an operator sets it: the flag and the environment variable.
    flag = "--" + variable.lower().replace("_", "-")
    where = f"{flag}, SAGAPLANE_OUTBOX_{variable}"
    return f"the outbox relay's {what} ({where}) must be {wanted}, not {value!r}"
