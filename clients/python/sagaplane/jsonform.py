"""Requests in their JSON form as people write them (saga files, ``--json`` input).

Protobuf's own JSON parser answers a misspelt field with the whole list of camelCase
names and a duration such as ``10 seconds`` with ``invalid literal for int()``. So
before it runs, :func:`prepare` walks the JSON against the message's descriptor: a
field that does not exist is an :class:`~sagaplane.errors.InvalidArgument` naming its
place (``steps[1].retry``) and the closest snake_case field (``did you mean
retry_policy?``), and every ``google.protobuf.Duration`` field takes the forms of
:func:`sagaplane.durations.parse_duration` (``10s``, ``1m30s``, ``10 seconds``, a number
of seconds), rewritten into the form protobuf reads. Free-form JSON (``Struct``
fields such as ``input`` and ``context``) is left as it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from sagaplane.durations import parse_duration, to_duration
from sagaplane.errors import InvalidArgument

__all__ = ["prepare"]

_DURATION = "google.protobuf.Duration"


def prepare(data: Mapping[str, Any], message: Descriptor, path: str = "") -> dict[str, Any]:
    """``data`` with its field names checked and its durations in protobuf's form.

    Raises InvalidArgument naming the place of the first unknown field or bad
    duration; other mistakes (a string where a list belongs) are left to protobuf.
    """
    prepared: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = _field(message, key)
        if field is None:
            raise InvalidArgument(f"{where}: no such field{_suggestion(message, str(key))}")
        prepared[key] = _value(field, value, where)
    return prepared


def _field(message: Descriptor, key: object) -> FieldDescriptor | None:
    if not isinstance(key, str):
        return None
    # protobuf's parser takes the proto name and the camelCase JSON name alike.
    found = message.fields_by_name.get(key)
    return found or next((f for f in message.fields if f.json_name == key), None)


def _value(field: FieldDescriptor, value: Any, where: str) -> Any:
    kind = field.message_type
    if kind is None or kind.GetOptions().map_entry:
        return value
    if field.is_repeated and isinstance(value, list):
        return [_one(kind, item, f"{where}[{i}]") for i, item in enumerate(value)]
    return _one(kind, value, where)


def _one(kind: Descriptor, value: Any, where: str) -> Any:
    if kind.full_name == _DURATION:
        if value is None:
            return value
        try:
            return to_duration(parse_duration(value)).ToJsonString()
        except ValueError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
    # Only our own messages: Struct, Value and the other well-known types have JSON
    # forms of their own.
    if kind.full_name.startswith("sagaplane.") and isinstance(value, Mapping):
        return prepare(value, kind, where)
    return value


def _suggestion(message: Descriptor, key: str) -> str:
    names = [f.name for f in message.fields]
    squashed = {_squash(name): name for name in names}
    close = squashed.get(_squash(key))
    if close is None:
        matches = difflib.get_close_matches(_squash(key), list(squashed), n=1, cutoff=0.6)
        close = squashed[matches[0]] if matches else None
    if close is None:
        close = next((name for name in names if name.startswith(key.lower())), None)
    return f"; did you mean {close}?" if close else f" (the fields are: {', '.join(names)})"


def _squash(name: str) -> str:
    """``stepTimeout``, ``step-timeout`` and ``step_timeout`` alike."""
    return name.lower().replace("_", "").replace("-", "")
