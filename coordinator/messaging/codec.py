"""Engine commands and replies <-> the protobuf envelopes of proto/messages.proto.

A reply comes from outside: :func:`decode_reply` checks everything in it that the store
or the engine relies on (ids, sizes, JSON that PostgreSQL can hold, bounded error text)
and raises :class:`UndecodableReply`, with the reason, for a reply that can never apply.

With signing keys (:mod:`sagaplane.signing`), :func:`command_encoder` signs each command
with the key of the service that owns its action, and :func:`verify_reply` checks a
reply's signature before anything else is read from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from coordinator.engine import Command, CommandKind, StepReplied
from coordinator.store.repository import is_id
from sagaplane import signing, structs, topology, wire
from sagaplane.limits import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    MAX_OUTPUT_BYTES,
    clean_text,
)
from sagaplane.outbox import OutboundMessage
from sagaplane.v1 import messages_pb2

# The wire's map, in the engine's vocabulary (CommandKind has the values of StepKind).
_KIND_FROM_PROTO = {proto: CommandKind(kind) for proto, kind in wire.KIND_FROM_PROTO.items()}


class UndecodableReply(ValueError):
    """The message is not a valid StepReply."""


def encode_command(command: Command) -> OutboundMessage:
    """The outbox row that carries ``command`` to its participant."""
    envelope = messages_pb2.StepCommand(
        saga_id=command.saga_id,
        step_id=command.step_id,
        step_name=command.step_name,
        saga_name=command.saga_name,
        attempt=command.attempt,
        kind=wire.KIND_TO_PROTO[command.kind],
        action=command.action,
        input=structs.to_struct(command.input),
        context=structs.to_struct(command.context),
        token=command.token,
    )
    if command.output is not None:
        envelope.output.CopyFrom(structs.to_struct(command.output))
    for name, output in command.results.items():
        envelope.results[name].CopyFrom(structs.to_struct(output))
    if command.deadline_at is not None and command.timeout is not None:
        envelope.deadline.FromDatetime(command.deadline_at)
        envelope.timeout.FromTimedelta(command.timeout)
    return OutboundMessage(
        message_id=wire.command_id(command.step_id, command.kind.value, command.attempt),
        exchange=topology.COMMANDS_EXCHANGE,
        routing_key=command.action,
        message_type=wire.COMMAND_TYPE,
        body=envelope.SerializeToString(),
        correlation_id=command.saga_id,
    )


def command_encoder(ring: signing.KeyRing | None) -> Callable[[Command], OutboundMessage]:
    """:func:`encode_command`, signing each command when ``ring`` holds keys.

    A command whose action belongs to a service without a key goes unsigned: a
    participant that verifies dead-letters it, and the reply of one that does not is
    dead-lettered here, so a missing key is seen at once, on both sides.
    """
    if ring is None:
        return encode_command

    def encode(command: Command) -> OutboundMessage:
        message = encode_command(command)
        keys = ring.keys(signing.owner(command.action))
        if keys is None:
            return message
        signature = signing.sign(
            keys,
            signer=signing.COORDINATOR,
            message_type=message.message_type,
            routing_key=message.routing_key,
            message_id=message.message_id,
            body=message.body,
        )
        return replace(message, headers={signing.SIGNATURE_HEADER: signature})

    return encode


def verify_reply(
    ring: signing.KeyRing,
    body: bytes,
    headers: Mapping[str, object] | None,
    message_id: str | None,
) -> str:
    """The service that signed a reply; raises :class:`~sagaplane.signing.BadSignature`.

    Whether that service owns the step's action is the engine's check (it knows the step).
    """
    headers = headers or {}
    signer = headers.get(signing.SIGNER_HEADER)
    if isinstance(signer, bytes):
        signer = signer.decode("utf-8", "replace")
    if not isinstance(signer, str) or not signer:
        raise signing.BadSignature(f"the reply is not signed (no {signing.SIGNER_HEADER} header)")
    keys = ring.keys(signer)
    if keys is None:
        raise signing.BadSignature(f"no signing key for service {signer[:100]!r}")
    signing.verify(
        keys,
        headers.get(signing.SIGNATURE_HEADER),
        signer=signer,
        message_type=wire.REPLY_TYPE,
        routing_key=topology.REPLIES_ROUTING_KEY,
        message_id=message_id or "",
        body=body,
    )
    return signer


def decode_reply(body: bytes) -> tuple[str, StepReplied]:
    """The saga id and engine event of a StepReply body; raises UndecodableReply."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise UndecodableReply(f"the body is {len(body)} bytes; at most {MAX_MESSAGE_BYTES}")
    reply = messages_pb2.StepReply()
    try:
        reply.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError, or others on garbage
        raise UndecodableReply(f"not a StepReply: {exc}") from exc
    kind = _KIND_FROM_PROTO.get(reply.kind)
    if not reply.saga_id or not reply.step_id or kind is None:
        raise UndecodableReply("StepReply lacks saga_id, step_id or kind")
    # Ids the coordinator issued are ULIDs: anything else can name no saga or step.
    if not is_id(reply.saga_id):
        raise UndecodableReply("saga_id is not a saga id (a ULID)")
    if not is_id(reply.step_id):
        raise UndecodableReply("step_id is not a step id (a ULID)")
    if len(reply.token) > MAX_ID_CHARS:
        raise UndecodableReply(f"token is longer than {MAX_ID_CHARS} characters")
    if reply.outcome not in (
        messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        messages_pb2.REPLY_OUTCOME_FAILED,
    ):
        raise UndecodableReply("StepReply has no outcome")
    succeeded = reply.outcome == messages_pb2.REPLY_OUTCOME_SUCCEEDED
    error = None
    output = None
    output_size = 0
    if not succeeded:
        # A failure is always reported, never refused for its text: cleaned and cut.
        message = clean_text(reply.error.message, MAX_ERROR_MESSAGE_CHARS) or "failed"
        kind_name = clean_text(reply.error.type, MAX_ERROR_TYPE_CHARS)
        error = f"{kind_name}: {message}" if kind_name else message
    elif kind is CommandKind.EXECUTE:
        # A compensation's output is the participant's own business (never stored).
        output_size = reply.output.ByteSize()
        if output_size <= MAX_OUTPUT_BYTES:  # a larger one is refused by the engine
            try:
                output = structs.decode(reply.output, "output")
            except structs.InvalidJson as exc:
                raise UndecodableReply(str(exc)) from exc
    return reply.saga_id, StepReplied(
        step_id=reply.step_id,
        kind=kind,
        attempt=reply.attempt,
        token=reply.token,
        succeeded=succeeded,
        output=output,
        error=error,
        retryable=reply.error.retryable,
        output_size=output_size,
    )
