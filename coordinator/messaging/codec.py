"""Engine commands and replies <-> the protobuf envelopes of proto/messages.proto."""

from __future__ import annotations

from coordinator.engine import Command, CommandKind, StepReplied
from sagaplane import structs, topology
from sagaplane.outbox import OutboundMessage
from sagaplane.v1 import messages_pb2

_KIND_TO_PROTO = {
    CommandKind.EXECUTE: messages_pb2.COMMAND_KIND_EXECUTE,
    CommandKind.COMPENSATE: messages_pb2.COMMAND_KIND_COMPENSATE,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}


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
        kind=_KIND_TO_PROTO[command.kind],
        action=command.action,
        input=structs.to_struct(command.input),
        context=structs.to_struct(command.context),
        token=command.token,
    )
    if command.output is not None:
        envelope.output.CopyFrom(structs.to_struct(command.output))
    return OutboundMessage(
        # Unique per dispatch, stable across relay retries: receivers dedupe on it.
        message_id=f"{command.step_id}:{command.kind.value}:{command.attempt}",
        exchange=topology.COMMANDS_EXCHANGE,
        routing_key=command.action,
        message_type=messages_pb2.StepCommand.DESCRIPTOR.full_name,
        body=envelope.SerializeToString(),
        correlation_id=command.saga_id,
    )


def decode_reply(body: bytes) -> tuple[str, StepReplied]:
    """The saga id and engine event of a StepReply body; raises UndecodableReply."""
    reply = messages_pb2.StepReply()
    try:
        reply.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError, or others on garbage
        raise UndecodableReply(f"not a StepReply: {exc}") from exc
    kind = _KIND_FROM_PROTO.get(reply.kind)
    if not reply.saga_id or not reply.step_id or kind is None:
        raise UndecodableReply("StepReply lacks saga_id, step_id or kind")
    if reply.outcome not in (
        messages_pb2.REPLY_OUTCOME_SUCCEEDED,
        messages_pb2.REPLY_OUTCOME_FAILED,
    ):
        raise UndecodableReply("StepReply has no outcome")
    succeeded = reply.outcome == messages_pb2.REPLY_OUTCOME_SUCCEEDED
    error = None
    if not succeeded:
        error = reply.error.message or "failed"
        if reply.error.type:
            error = f"{reply.error.type}: {error}"
    return reply.saga_id, StepReplied(
        step_id=reply.step_id,
        kind=kind,
        attempt=reply.attempt,
        token=reply.token,
        succeeded=succeeded,
        output=structs.to_dict(reply.output) if succeeded else None,
        error=error,
        retryable=reply.error.retryable,
    )
