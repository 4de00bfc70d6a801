"""The AMQP wire between the coordinator and participants, one copy for both sides.

What the two ends must agree on beyond ``proto/sagaplane/v1/messages.proto``: the kind
of a command in both vocabularies (:class:`StepKind` and the protobuf ``CommandKind``),
the message ids (:func:`command_id`, :func:`reply_id`), the AMQP ``type`` of each
envelope, and what makes a StepCommand one that a participant can handle
(:func:`decode_command`). The coordinator's codec (``coordinator/messaging/codec.py``)
and the SDK's participant both use this module; it imports nothing of the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from google.protobuf.message import DecodeError

from sagaplane import structs
from sagaplane.limits import MAX_ID_CHARS, MAX_MESSAGE_BYTES, MAX_STEP_TIMEOUT, MAX_TEXT_CHARS
from sagaplane.v1 import messages_pb2

__all__ = [
    "COMMAND_TYPE",
    "KIND_FROM_PROTO",
    "KIND_TO_PROTO",
    "REPLY_TYPE",
    "TEXT_LIMITS",
    "StepKind",
    "Undecodable",
    "command_id",
    "deadline",
    "decode_command",
    "payloads",
    "reply_id",
    "results",
]


class StepKind(StrEnum):
    """Whether a command runs a step's action or its compensation (as in message ids)."""

    EXECUTE = "execute"
    COMPENSATE = "compensate"


KIND_FROM_PROTO: Final[Mapping[messages_pb2.CommandKind.ValueType, StepKind]] = {
    messages_pb2.COMMAND_KIND_EXECUTE: StepKind.EXECUTE,
    messages_pb2.COMMAND_KIND_COMPENSATE: StepKind.COMPENSATE,
}
"""The kind of a StepCommand or StepReply envelope; a missing key is no valid kind."""

KIND_TO_PROTO: Final[Mapping[str, messages_pb2.CommandKind.ValueType]] = {
    v: k for k, v in KIND_FROM_PROTO.items()
}
"""The envelope's kind of ``"execute"`` or ``"compensate"`` (any StrEnum of those values,
such as the coordinator's ``CommandKind``, works as a key)."""

COMMAND_TYPE: Final = messages_pb2.StepCommand.DESCRIPTOR.full_name
"""The AMQP ``type`` of a command."""
REPLY_TYPE: Final = messages_pb2.StepReply.DESCRIPTOR.full_name
"""The AMQP ``type`` of a reply."""

TEXT_LIMITS: Final[Mapping[str, int]] = {
    "saga_id": MAX_ID_CHARS,
    "step_id": MAX_ID_CHARS,
    "token": MAX_ID_CHARS,
    "action": MAX_TEXT_CHARS,
    "step_name": MAX_TEXT_CHARS,
    "saga_name": MAX_TEXT_CHARS,
}
"""What the inbox stores or a handler is given, with the coordinator's own limits."""


def command_id(step_id: str, kind: str, attempt: int) -> str:
    """The message id of a command: unique per dispatch, stable across relay retries, so
    receivers dedupe on it. ``kind`` is ``"execute"`` or ``"compensate"``."""
    return f"{step_id}:{kind}:{attempt}"


def reply_id(step_id: str, kind: str, attempt: int) -> str:
    """The message id of the reply to a command: one per command answered, so copies of
    one command get identical replies, and receivers may deduplicate them on it."""
    return f"{command_id(step_id, kind, attempt)}:reply"


class Undecodable(ValueError):
    """The message is not a StepCommand a participant can handle; the text says why."""


def decode_command(body: bytes, message_type: str | None) -> messages_pb2.StepCommand:
    """Check everything the inbox or a handler relies on; raises :class:`Undecodable`.

    ``message_type`` is the AMQP ``type`` property (empty or None: not checked).
    """
    if message_type and message_type != COMMAND_TYPE:
        raise Undecodable(f"type is {message_type!r}, not {COMMAND_TYPE!r}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise Undecodable(f"the body is {len(body)} bytes; at most {MAX_MESSAGE_BYTES}")
    command = messages_pb2.StepCommand()
    try:
        command.ParseFromString(body)
    except (DecodeError, ValueError, TypeError) as exc:
        raise Undecodable(f"not a StepCommand: {exc}") from exc
    if not command.saga_id or not command.step_id or not command.action:
        raise Undecodable("StepCommand lacks saga_id, step_id or action")
    if command.kind not in KIND_FROM_PROTO:
        raise Undecodable(f"StepCommand has no valid kind ({command.kind})")
    if command.attempt < 1:
        raise Undecodable("StepCommand has no attempt")
    for field, limit in TEXT_LIMITS.items():
        value = getattr(command, field)
        if len(value) > limit:
            raise Undecodable(f"{field} is longer than {limit} characters")
        if "\x00" in value:
            raise Undecodable(f"{field} contains a NUL character")
    for name in command.results:
        if len(name) > MAX_TEXT_CHARS or "\x00" in name:
            raise Undecodable("results holds a key that is no step name")
    try:
        payloads(command)
        results(command)
    except structs.InvalidJson as exc:
        raise Undecodable(str(exc)) from exc
    _check_deadline(command)
    return command


def payloads(
    command: messages_pb2.StepCommand,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The command's input, context and (compensations only) output; raises InvalidJson."""
    output = None
    if command.kind == messages_pb2.COMMAND_KIND_COMPENSATE and command.HasField("output"):
        output = structs.decode(command.output, "output")
    return (
        structs.decode(command.input, "input"),
        structs.decode(command.context, "context"),
        output,
    )


def results(command: messages_pb2.StepCommand) -> dict[str, dict[str, Any]]:
    """The outputs of the completed steps the command's step depends on, by step name;
    raises InvalidJson."""
    return {
        name: structs.decode(output, f"results.{name}") for name, output in command.results.items()
    }


def deadline(command: messages_pb2.StepCommand) -> tuple[datetime, timedelta] | None:
    """The attempt's deadline (aware, on the coordinator's clock) and timeout; None for
    a command without them. Checked by :func:`decode_command`."""
    if not command.HasField("timeout"):
        return None
    return command.deadline.ToDatetime(tzinfo=UTC), command.timeout.ToTimedelta()


# What a Timestamp may hold (0001-01-01 to 9999-12-31, as datetime can).
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799
_NANOS = 1_000_000_000
_MAX_TIMEOUT_NANOS = MAX_STEP_TIMEOUT // timedelta(microseconds=1) * 1000


def _check_deadline(command: messages_pb2.StepCommand) -> None:
    has_deadline, has_timeout = command.HasField("deadline"), command.HasField("timeout")
    if has_deadline != has_timeout:
        raise Undecodable("StepCommand has one of deadline and timeout without the other")
    if not has_timeout:
        return
    timeout, at = command.timeout, command.deadline
    # Checked on the fields, before a conversion can overflow.
    total = timeout.seconds * _NANOS + timeout.nanos
    if not 0 <= timeout.nanos < _NANOS or not 0 < total <= _MAX_TIMEOUT_NANOS:
        raise Undecodable(f"timeout must be positive and at most {MAX_STEP_TIMEOUT}")
    if not 0 <= at.nanos < _NANOS or not _MIN_SECONDS <= at.seconds <= _MAX_SECONDS:
        raise Undecodable("deadline is not a valid timestamp")
