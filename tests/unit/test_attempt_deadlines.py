"""Attempt deadlines on the wire and on a participant's clocks (pure: the clocks are
passed in): what the coordinator sends, what the SDK makes of it, what it refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coordinator.engine import Command, CommandKind
from coordinator.messaging.codec import encode_command
from sagaplane import deadlines, wire
from sagaplane.v1 import messages_pb2

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
MONO = 1000.0
"""time.monotonic() at NOW."""


def command(
    *, deadline_at: datetime | None = NOW + timedelta(seconds=2), timeout: float | None = 2.0
) -> messages_pb2.StepCommand:
    """A StepCommand as the coordinator encodes it."""
    body = encode_command(
        Command(
            saga_id="01J0000000000000000000SAGA",
            saga_name="users.create",
            step_id="01J0000000000000000000STEP",
            step_name="create",
            kind=CommandKind.EXECUTE,
            action="users.create",
            attempt=1,
            input={},
            output=None,
            context={},
            token="t",
            deadline_at=deadline_at,
            timeout=None if timeout is None else timedelta(seconds=timeout),
        )
    ).body
    return wire.decode_command(body, wire.COMMAND_TYPE)


def at(
    cmd: messages_pb2.StepCommand, *, offset: float = 0.0, **kwargs: object
) -> deadlines.Deadline:
    """The deadline of ``cmd`` arriving ``offset`` seconds after NOW, on this host."""
    found = deadlines.for_command(
        cmd,
        arrived_at=NOW + timedelta(seconds=offset),
        arrived=MONO + offset,
        **kwargs,  # type: ignore[arg-type]
    )
    assert found is not None
    return found


def test_the_coordinator_sends_the_attempts_deadline_and_timeout() -> None:
    cmd = command(deadline_at=NOW + timedelta(milliseconds=2500), timeout=2.5)
    assert wire.deadline(cmd) == (NOW + timedelta(milliseconds=2500), timedelta(seconds=2.5))


def test_a_command_without_a_deadline_has_none() -> None:
    cmd = command(deadline_at=None, timeout=None)
    assert not cmd.HasField("deadline") and not cmd.HasField("timeout")
    assert deadlines.for_command(cmd, arrived_at=NOW, arrived=MONO) is None


def test_a_command_arriving_at_once_gets_its_whole_timeout_less_the_margin() -> None:
    d = at(command())
    assert d.clock_trusted and d.late == 0.0
    assert d.end == pytest.approx(MONO + 2.0)
    assert d.cutoff == pytest.approx(MONO + 1.8)  # a tenth of 2 s is kept for the SDK
    assert d.cutoff_at == NOW + timedelta(seconds=1.8)
    assert d.exceeded() == "deadline exceeded after 2.0s"


def test_a_command_that_waited_in_the_queue_gets_only_what_is_left() -> None:
    d = at(command(), offset=1.5)
    assert d.clock_trusted
    assert d.end == pytest.approx(MONO + 2.0)  # the coordinator's deadline, not arrival + 2
    assert d.handler_left(MONO + 1.5) == pytest.approx(0.3)


def test_a_command_arriving_after_its_deadline_says_how_late_it_is() -> None:
    d = at(command(), offset=5.25)
    assert d.handler_left(MONO + 5.25) < 0
    assert d.late == pytest.approx(3.25)
    assert d.exceeded_before_start() == (
        "deadline exceeded after 2.0s (not run: the command arrived 3.2s after its deadline; "
        "it waited in the queue, or this host's clock is ahead of the coordinator's)"
    )


def test_a_host_clock_behind_within_the_tolerance_changes_nothing_it_need_not() -> None:
    # This host reads 0.5 s less than the coordinator: the deadline looks 2.5 s away.
    d = at(command(), offset=-0.5)
    assert d.clock_trusted
    assert d.end == pytest.approx(MONO - 0.5 + 2.0)  # never more than the whole timeout


def test_a_host_clock_far_behind_counts_the_timeout_from_arrival() -> None:
    # The deadline lies 62 s away for a 2 s timeout: impossible unless the clock is wrong.
    d = at(command(), offset=-60.0)
    assert not d.clock_trusted
    assert d.end == pytest.approx(MONO - 60.0 + 2.0)
    assert d.late == 0.0


def test_without_clock_tolerance_the_absolute_deadline_is_never_used() -> None:
    d = at(command(), offset=1.5, clock_tolerance=None)
    assert not d.clock_trusted
    assert d.end == pytest.approx(MONO + 1.5 + 2.0)


@pytest.mark.parametrize(
    ("timeout", "margin", "shown"),
    [(2.0, 0.2, "2.0"), (0.25, 0.025, "0.25"), (30.0, 0.5, "30.0"), (1.5, 0.15, "1.5")],
)
def test_the_margin_is_a_tenth_of_the_timeout_at_most_half_a_second(
    timeout: float, margin: float, shown: str
) -> None:
    d = at(command(deadline_at=NOW + timedelta(seconds=timeout), timeout=timeout))
    assert d.margin == pytest.approx(margin)
    assert d.exceeded() == f"deadline exceeded after {shown}s"


def _raw(**fields: object) -> bytes:
    cmd = messages_pb2.StepCommand(
        saga_id="s", step_id="st", action="a", kind=messages_pb2.COMMAND_KIND_EXECUTE, attempt=1
    )
    for name, (seconds, nanos) in fields.items():  # type: ignore[misc]
        getattr(cmd, name).seconds = seconds
        getattr(cmd, name).nanos = nanos
    return cmd.SerializeToString()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"deadline": (1, 0)}, "one of deadline and timeout"),
        ({"timeout": (1, 0)}, "one of deadline and timeout"),
        ({"deadline": (1, 0), "timeout": (0, 0)}, "timeout must be positive"),
        ({"deadline": (1, 0), "timeout": (-1, 0)}, "timeout must be positive"),
        ({"deadline": (1, 0), "timeout": (86401, 0)}, "at most 1 day"),
        ({"deadline": (1, 0), "timeout": (2**62, 0)}, "at most 1 day"),
        ({"deadline": (1, 0), "timeout": (1, 10**9)}, "timeout must be positive"),
        ({"deadline": (2**62, 0), "timeout": (1, 0)}, "deadline is not a valid timestamp"),
        ({"deadline": (1, -1), "timeout": (1, 0)}, "deadline is not a valid timestamp"),
    ],
)
def test_a_deadline_that_cannot_be_is_refused_with_its_reason(
    fields: dict[str, tuple[int, int]], reason: str
) -> None:
    with pytest.raises(wire.Undecodable, match=reason):
        wire.decode_command(_raw(**fields), None)


def test_the_extreme_deadlines_a_timestamp_can_hold_are_handled() -> None:
    for seconds in (-62135596800, 253402300799):
        cmd = wire.decode_command(_raw(deadline=(seconds, 0), timeout=(86400, 0)), None)
        d = at(cmd)
        assert d.cutoff_at.tzinfo is not None
