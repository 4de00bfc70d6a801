"""Attempt deadlines: until when a command's handler and its transaction may run here.

A StepCommand carries its attempt's deadline twice (``proto/sagaplane/v1/messages.proto``):
``deadline``, the instant the coordinator times the attempt out (the dispatch time plus
the step's timeout, on the coordinator's DATABASE clock), and ``timeout``, the step's
per-attempt timeout as a duration. Each answers a doubt the other cannot:

- The duration needs no clock in common with the coordinator, but knows nothing of the
  time the command spent before it arrived here: waiting in the queue behind others,
  or delivered again after a participant crashed. The coordinator counts from
  dispatch, and its timer fires at the deadline whatever the participant does. A
  handler that starts late and takes its whole timeout overruns the attempt: the
  coordinator has given up on it, its reply is thrown away, and the retry may be
  waiting for the inbox row lock this handler holds.
- The instant accounts for all of that, if this host's clock agrees with the
  coordinator database's.

So an attempt ends here at the EARLIER of ``arrival + timeout`` and ``deadline`` (read on
this host's clock), and the instant is believed only as far as it is plausible: a
deadline further away than the whole timeout (by more than ``clock_tolerance``) cannot
be right, since no command arrives before it was sent, so this host's clock is behind
and the duration alone counts. A clock AHEAD of the coordinator's cannot be told from
a wait in the queue: it shortens every attempt by its offset. Keep the hosts' clocks
synchronised (NTP keeps them within milliseconds), or give ``clock_tolerance=None`` to
count every attempt from its arrival only, as gRPC counts its timeouts. A command whose
time is up before its handler could start is answered at once with the failure, its
handler not run, and the message says how late it arrived: a stuck queue and a wrong
clock both show in ``GetSaga``.

Of that time, a margin (a tenth of the timeout, at most half a second) is kept for the
SDK: the handler is cancelled the margin before the end (:attr:`Deadline.cutoff`), so
that the rollback, the failure and its reply commit while the coordinator still waits:
a failure that arrives in time tells it the attempt's writes were rolled back, where
its own timeout would leave the outcome unknown (and the step to be compensated).
PostgreSQL ends the transaction at the end itself (see :mod:`sagaplane.inbox`).

This module is pure (the clocks are passed in); :func:`for_command` is its entry point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sagaplane import wire
from sagaplane.v1 import messages_pb2

__all__ = ["DEFAULT_CLOCK_TOLERANCE", "MAX_MARGIN", "Deadline", "for_command", "margin"]

DEFAULT_CLOCK_TOLERANCE = 1.0
"""Seconds by which a command's deadline may lie beyond its whole timeout before this
host's clock is taken to be behind the coordinator's (and the deadline ignored)."""

MAX_MARGIN = 0.5
"""The most time kept for the SDK between the handler's cutoff and the attempt's end."""


def margin(timeout: timedelta) -> float:
    """Seconds kept for the SDK's rollback and reply: a tenth of ``timeout``, at most
    :data:`MAX_MARGIN`."""
    return min(timeout.total_seconds() / 10, MAX_MARGIN)


@dataclass(frozen=True, kw_only=True)
class Deadline:
    """When one attempt ends on this host, on both of its clocks."""

    timeout: timedelta
    """The step's per-attempt timeout, as the command gave it."""
    end: float
    """When the attempt ends here (``time.monotonic()``): PostgreSQL's limit."""
    cutoff: float
    """When the handler is cancelled (``time.monotonic()``): ``end`` minus the margin."""
    cutoff_at: datetime
    """:attr:`cutoff` on this host's wall clock (aware, UTC)."""
    late: float
    """Seconds after the end that the command arrived (0.0 if in time)."""
    clock_trusted: bool
    """Whether the command's absolute deadline was used (False: the timeout alone)."""

    @property
    def margin(self) -> float:
        """Seconds between the handler's cutoff and the attempt's end."""
        return self.end - self.cutoff

    def left(self, now: float | None = None) -> float:
        """Seconds until the attempt's end (negative once it passed)."""
        return self.end - (time.monotonic() if now is None else now)

    def handler_left(self, now: float | None = None) -> float:
        """Seconds until the handler is cancelled (negative once it passed)."""
        return self.cutoff - (time.monotonic() if now is None else now)

    def exceeded(self) -> str:
        """The failure's message: ``deadline exceeded after 2.0s`` (the timeout)."""
        return f"deadline exceeded after {_seconds(self.timeout)}s"

    def exceeded_before_start(self) -> str:
        """The failure's message for a handler whose time was up before it could start:
        :meth:`exceeded`, and how late the command arrived if it did."""
        if self.late <= 0:
            return self.exceeded()
        return (
            f"{self.exceeded()} (not run: the command arrived {self.late:.1f}s after its "
            "deadline; it waited in the queue, or this host's clock is ahead of the "
            "coordinator's)"
        )


def for_command(
    command: messages_pb2.StepCommand,
    *,
    arrived_at: datetime,
    arrived: float,
    clock_tolerance: float | None = DEFAULT_CLOCK_TOLERANCE,
) -> Deadline | None:
    """The deadline of ``command``, which arrived at ``arrived_at`` (this host's wall
    clock, aware) and ``arrived`` (``time.monotonic()``); None if it has none.

    ``clock_tolerance``: seconds by which the command's deadline may lie beyond its
    whole timeout and still be believed; None: never use the absolute deadline.
    """
    found = wire.deadline(command)
    if found is None:
        return None
    deadline_at, timeout = found
    budget = timeout.total_seconds()
    trusted = False
    if clock_tolerance is not None:
        remaining = (deadline_at - arrived_at).total_seconds()
        if remaining <= budget + clock_tolerance:
            # Plausible: the command was sent before it arrived. It may have waited.
            budget, trusted = min(budget, remaining), True
    end = arrived + budget
    cutoff = end - margin(timeout)
    return Deadline(
        timeout=timeout,
        end=end,
        cutoff=cutoff,
        cutoff_at=_wall(arrived_at, cutoff - arrived),
        late=max(0.0, -budget),
        clock_trusted=trusted,
    )


def _wall(at: datetime, seconds: float) -> datetime:
    # A deadline years away (a coordinator's clock far ahead) must not overflow datetime.
    try:
        return (at + timedelta(seconds=seconds)).astimezone(UTC)
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if seconds > 0 else datetime.min.replace(tzinfo=UTC)


def _seconds(value: timedelta) -> str:
    """2.0, 0.25, 1.5: a tenth always shown, and as many more digits as the value has."""
    text = f"{value.total_seconds():.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text
