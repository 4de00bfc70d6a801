"""JSON objects <-> ``google.protobuf.Struct``, the one place both directions live.

Struct carries every number as a double; integral values come back as ``int``
so that ``{"qty": 2}`` round-trips as ``2``, not ``2.0``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

_MAX_EXACT = 2**53


def integral(value: Any) -> Any:
    """``value`` (decoded JSON) with whole floats made ints, as far as a double is exact.

    A Struct holds every number as a double; ``{"qty": 2}`` comes back as ``2.0``.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON object a Struct holds."""
    result: dict[str, Any] = integral(json_format.MessageToDict(struct))
    return result


def to_struct(obj: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct holding ``obj`` (an empty one for None)."""
    struct = struct_pb2.Struct()
    if obj:
        struct.update(obj)
    return struct
