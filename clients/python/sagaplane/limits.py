"""The wire's limits, shared by the coordinator and every participant (see the README).

Everything a saga holds must fit in what PostgreSQL, protobuf's JSON mapping and a
gRPC client's default 4 MiB message can carry, so each payload has a limit that the
sender checks before sending and the receiver checks again on receipt:

- JSON objects (context, inputs, outputs) hold finite numbers only, no NUL character
  in any string or key (PostgreSQL's text and jsonb cannot store it), and are nested at
  most :data:`MAX_JSON_DEPTH` levels.
- A step's output is at most :data:`MAX_OUTPUT_BYTES`; all outputs of one saga together
  at most :data:`MAX_SAGA_OUTPUT_BYTES`, and all its inputs as sent (references
  resolved) at most :data:`MAX_SAGA_INPUT_BYTES`. That keeps GetSaga of any saga under
  8 MiB of JSON; ``SagaClient`` reads answers of up to 64 MiB (gRPC's default is 4 MiB).
- An error's type is at most :data:`MAX_ERROR_TYPE_CHARS` characters and its message at
  most :data:`MAX_ERROR_MESSAGE_CHARS`; longer ones are cut, and NUL characters are
  replaced (:func:`clean_text`): an error is reported, never refused.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = [
    "MAX_ERROR_MESSAGE_CHARS",
    "MAX_ERROR_TYPE_CHARS",
    "MAX_EVENT_ATTRIBUTE_CHARS",
    "MAX_EVENT_BYTES",
    "MAX_EVENT_TYPE_BYTES",
    "MAX_ID_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE_BYTES",
    "MAX_OUTPUT_BYTES",
    "MAX_SAGA_INPUT_BYTES",
    "MAX_SAGA_OUTPUT_BYTES",
    "MAX_STEP_TIMEOUT",
    "MAX_TEXT_CHARS",
    "clean_text",
]

MAX_JSON_DEPTH = 20
"""Nesting levels of a JSON object ({"a": {}} is 2). Protobuf's own decoder stops near 30
levels of Struct nesting: ours must bite first, with a message that names the field."""
MAX_OUTPUT_BYTES = 64 * 1024
"""A step output's size, as a serialized ``google.protobuf.Struct``."""
MAX_SAGA_OUTPUT_BYTES = 2 * 1024 * 1024
"""The outputs of one saga's steps together, as compact JSON."""
MAX_SAGA_INPUT_BYTES = 2 * 1024 * 1024
"""The inputs of one saga's steps together as they are sent (references resolved), as
compact JSON: a step whose references would pass it fails at dispatch."""
MAX_ERROR_TYPE_CHARS = 200
"""``StepError.type``."""
MAX_ERROR_MESSAGE_CHARS = 2000
"""``StepError.message``."""
MAX_ID_CHARS = 64
"""Saga and step ids, and command tokens, on the wire."""
MAX_TEXT_CHARS = 200
"""Names and actions on the wire (the gRPC API's own limit)."""
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""An AMQP command or reply body. The largest command the coordinator can build is a
compensation of a saga's 100th step that depends on the 99 others: its input with
references resolved, the context, its own output and 99 outputs of 64 KiB each, 6.6 MiB
in all (``tests/unit/test_command_size.py`` builds it); a reply is far smaller."""
MAX_EVENT_BYTES = 256 * 1024
"""A domain event as it is sent (the whole CloudEvent, JSON): what ``emit`` accepts."""
MAX_EVENT_TYPE_BYTES = 255
"""An event's ``type``, in UTF-8: it is the AMQP routing key, a short string."""
MAX_EVENT_ATTRIBUTE_CHARS = 1000
"""An event's ``id``, ``source`` and ``subject`` (``id`` and ``source`` key the inbox)."""
MAX_STEP_TIMEOUT = timedelta(days=1)
"""A step's per-attempt timeout (StartSaga's ``timeout`` and ``step_timeout``, and a
StepCommand's ``timeout``)."""

_REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


def clean_text(text: str, limit: int) -> str:
    """``text`` fit for PostgreSQL and a bounded message: NUL characters replaced by U+FFFD,
    cut to ``limit`` characters (the cut marked with an ellipsis)."""
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    if len(text) > limit:
        text = text[: max(0, limit - 1)] + "\N{HORIZONTAL ELLIPSIS}"
    return text
