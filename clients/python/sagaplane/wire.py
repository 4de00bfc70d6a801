"""The AMQP wire between the coordinator and participants, one copy for both sides.

What the two ends must agree on beyond ``proto/sagaplane/v1/messages.proto``: the kind
of a command in both vocabularies (:class:`StepKind` and the protobuf ``CommandKind``),
the message ids (:func:`command_id`, :func:`reply_id`), the AMQP ``type`` of each
envelope, and what makes a StepCommand one that a participant can handle
(:func:`decode_command`), and the domain events' envelope (:class:`Event`,
:func:`encode_event`, :func:`decode_event`). The coordinator's codec
(``coordinator/messaging/codec.py``) and the SDK's participant both use this module; it
imports nothing of the coordinator.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from cloudevents.core.bindings import rabbitmq
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent
from google.protobuf.message import DecodeError

from sagaplane import structs
from sagaplane.errors import InvalidEvent
from sagaplane.limits import (
    MAX_EVENT_ATTRIBUTE_CHARS,
    MAX_EVENT_BYTES,
    MAX_EVENT_TYPE_BYTES,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_STEP_TIMEOUT,
    MAX_TEXT_CHARS,
)
from sagaplane.topology import EVENT_CONTENT_TYPE
from sagaplane.v1 import messages_pb2

__all__ = [
    "COMMAND_TYPE",
    "KIND_FROM_PROTO",
    "KIND_TO_PROTO",
    "REPLY_TYPE",
    "TEXT_LIMITS",
    "Event",
    "StepKind",
    "Undecodable",
    "command_id",
    "deadline",
    "decode_command",
    "decode_event",
    "encode_event",
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


# == domain events ======================================================================
#
# A domain event is a CloudEvents 1.0 event in the JSON event format, sent in the AMQP
# binding's STRUCTURED content mode: the body is the whole event (attributes and data)
# as one JSON object, content type application/cloudevents+json. Structured, not binary
# (attributes as ``ce-`` headers), because the body then needs nothing but a JSON parser
# to read, in any language, with any AMQP client; and because the outbox row's body is
# then the whole event, with no per-row headers for the relay to carry. Binary-mode
# events (from other producers) are accepted on the way in all the same.

_DATA_CONTENT_TYPE = "application/json"
_CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema"}
)


@dataclass(frozen=True, kw_only=True)
class Event:
    """A CloudEvents 1.0 event, as emitted or as received."""

    type: str
    """What happened (``order.created``); the routing key, matched by ``on_event`` patterns."""
    source: str
    """Who says so: by default the emitting service's name. With :attr:`id`, unique."""
    id: str
    """Unique per source (a ULID by default); consumers deduplicate on (source, id)."""
    time: datetime | None
    """When it was emitted (aware)."""
    subject: str | None = None
    """What it is about within the source (an order id, say)."""
    data: Any = None
    """The payload: a JSON object (dict) for events Sagaplane emits."""
    extensions: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """CloudEvents extension attributes (lowercase alphanumeric names)."""


def encode_event(event: Event) -> bytes:
    """The event in CloudEvents' JSON format (structured mode); raises :class:`InvalidEvent`."""
    _check_event_text("type", event.type)
    _check_event_text("source", event.source)
    _check_event_text("id", event.id)
    if len(event.type.encode()) > MAX_EVENT_TYPE_BYTES:
        raise InvalidEvent(f"type must be at most {MAX_EVENT_TYPE_BYTES} bytes (a routing key)")
    if event.subject is not None:
        _check_event_text("subject", event.subject)
    if event.data is not None and not isinstance(event.data, Mapping):
        raise InvalidEvent(f"data must be a JSON object (a dict), not {type(event.data).__name__}")
    clash = sorted(_CORE_ATTRIBUTES & set(event.extensions))
    if clash:
        raise InvalidEvent(f"extensions must not set the core attribute(s) {', '.join(clash)}")
    attributes: dict[str, Any] = {
        **event.extensions,
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "datacontenttype": _DATA_CONTENT_TYPE,
    }
    if event.time is not None:
        attributes["time"] = event.time
    if event.subject is not None:
        attributes["subject"] = event.subject
    try:
        cloud = CloudEvent(attributes, None if event.data is None else dict(event.data))
        body = rabbitmq.to_structured_event(cloud).body
    except BaseCloudEventException as exc:
        raise InvalidEvent(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"data is not JSON: {exc}") from None
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"the event is {len(body)} bytes; at most {MAX_EVENT_BYTES} are sent")
    return body


def decode_event(
    body: bytes, content_type: str | None, headers: Mapping[str, Any] | None = None
) -> Event:
    """A received event, structured or binary mode (``ce-`` headers); raises
    :class:`Undecodable` with the reason for anything that is not a CloudEvents 1.0 event
    within the limits."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise Undecodable(f"the event is {len(body)} bytes, more than {MAX_MESSAGE_BYTES}")
    text_headers = {
        str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for k, v in (headers or {}).items()
    }
    if not (content_type or "").startswith("application/cloudevents") and not any(
        k.startswith("ce-") for k in text_headers
    ):
        raise Undecodable(
            f"not a CloudEvent: content type {content_type!r} and no ce- headers "
            f"(expected {EVENT_CONTENT_TYPE})"
        )
    # The library fills in a missing id, specversion or time (a random id would defeat
    # deduplication): they must be there on the wire.
    present = _present_attributes(body, content_type, text_headers)
    for required in ("specversion", "id"):
        if required not in present:
            raise Undecodable(f"not a CloudEvent: it has no {required}")
    try:
        message = rabbitmq.RabbitMQMessage(
            headers=text_headers, content_type=content_type, body=body
        )
        cloud = rabbitmq.from_rabbitmq_event(message)
    except Exception as exc:  # the library raises what its parsers raise
        raise Undecodable(f"not a CloudEvents 1.0 event: {type(exc).__name__}: {exc}") from None
    if cloud.get_specversion() != "1.0":
        raise Undecodable(f"specversion {cloud.get_specversion()!r} is not 1.0")
    for name in ("id", "source", "type", "subject"):
        value = cloud.get_attributes().get(name)
        if value is None and name == "subject":
            continue
        if not isinstance(value, str) or not value:
            raise Undecodable(f"the event's {name} must be a non-empty string")
        if len(value) > MAX_EVENT_ATTRIBUTE_CHARS or "\x00" in value:
            raise Undecodable(
                f"the event's {name} is longer than {MAX_EVENT_ATTRIBUTE_CHARS} characters "
                "or holds a NUL character"
            )
    event_time = cloud.get_time() if "time" in present else None
    if event_time is not None and event_time.tzinfo is None:
        event_time = event_time.replace(tzinfo=UTC)
    return Event(
        type=cloud.get_type(),
        source=cloud.get_source(),
        id=cloud.get_id(),
        time=event_time,
        subject=cloud.get_subject(),
        data=cloud.get_data(),
        extensions={k: v for k, v in cloud.get_attributes().items() if k not in _CORE_ATTRIBUTES},
    )


def _present_attributes(
    body: bytes, content_type: str | None, headers: Mapping[str, str]
) -> set[str]:
    if (content_type or "").startswith("application/cloudevents"):
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise Undecodable(f"not a CloudEvent: the body is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise Undecodable("not a CloudEvent: the body is not a JSON object")
        return set(parsed)
    return {k[3:] for k in headers if k.startswith("ce-")}


def _check_event_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"{name} must be a non-empty string")
    if len(value) > MAX_EVENT_ATTRIBUTE_CHARS:
        raise InvalidEvent(f"{name} must be at most {MAX_EVENT_ATTRIBUTE_CHARS} characters")
    if "\x00" in value:
        raise InvalidEvent(f"{name} must not contain NUL characters")
