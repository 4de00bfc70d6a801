"""JSON objects <-> ``google.protobuf.Struct``, the one place both directions live.

Struct carries every number as a double; integral values come back as ``int``
so that ``{"qty": 2}`` round-trips as ``2``, not ``2.0``.

:func:`decode` is the checked direction, for a Struct that came from outside (a gRPC
request, an AMQP message): it refuses what PostgreSQL or protobuf's JSON mapping cannot
hold (NaN and infinities, NUL characters, unset values, nesting past
:data:`~sagaplane.limits.MAX_JSON_DEPTH`) with an :class:`InvalidJson` that names the
offending place, e.g. ``steps[0].input.items[2].price: is not a finite number``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from sagaplane.limits import MAX_JSON_DEPTH

__all__ = ["InvalidJson", "decode", "encode", "integral", "to_dict", "to_struct"]

_MAX_EXACT = 2**53
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InvalidJson(ValueError):
    """A Struct that is not a JSON object Sagaplane can store."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        """Where: the field name, then keys and indexes (``context.items[2]``)."""
        self.problem = problem
        """What is wrong there."""


def integral(value: Any) -> Any:
    """``value`` (decoded JSON) with whole floats made ints, as far as a double is exact.

    A Struct holds every number as a double; ``{"qty": 2}`` comes back as ``2.0``.
    """
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON object a Struct holds (unchecked: for Structs this process built)."""
    result: dict[str, Any] = integral(json_format.MessageToDict(struct))
    return result


def to_struct(obj: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct holding ``obj`` (an empty one for None)."""
    struct = struct_pb2.Struct()
    if obj:
        struct.update(obj)
    return struct


def encode(obj: Mapping[str, Any] | None, field: str) -> struct_pb2.Struct:
    """A Struct holding ``obj``, a JSON object from this process's caller; raises
    :class:`InvalidJson` naming the place of a value JSON cannot carry (a ``date``, a
    ``Decimal``, a set, NaN, a key that is not a string) rather than protobuf's
    ``ValueError: Unexpected type``."""
    if obj is None:
        return struct_pb2.Struct()
    if not isinstance(obj, Mapping):
        raise InvalidJson(field, f"is {_a(obj)}, not a JSON object (a dict)")
    _check(obj, field)
    return to_struct(dict(obj))


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, bool | str | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidJson(path, "is not a finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidJson(path, f"has the key {key!r}: JSON keys are strings")
            _check(item, _key_path(path, key))
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    hint = " (send it as a string: value.isoformat())" if hasattr(value, "isoformat") else ""
    raise InvalidJson(
        path,
        f"is {_a(value)}, which JSON cannot carry: use null, true/false, a number, a "
        f"string, a list or an object{hint}",
    )


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def decode(
    struct: struct_pb2.Struct, field: str, *, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """The JSON object a Struct from outside holds; raises :class:`InvalidJson`.

    ``field`` names the Struct in error messages.
    """
    try:
        return _object(struct, field, 1, max_depth)
    except _TooDeep as exc:
        # Said of the whole field: the path down to the limit helps nobody.
        raise InvalidJson(field, f"is nested deeper than {max_depth} levels") from exc


class _TooDeep(Exception):
    pass


def _object(struct: struct_pb2.Struct, path: str, depth: int, max_depth: int) -> dict[str, Any]:
    if depth > max_depth:
        raise _TooDeep
    result: dict[str, Any] = {}
    for key, value in struct.fields.items():
        where = _key_path(path, key)
        if "\x00" in key:
            raise InvalidJson(where, "the key contains a NUL character")
        result[key] = _value(value, where, depth, max_depth)
    return result


def _value(value: struct_pb2.Value, path: str, depth: int, max_depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        if "\x00" in text:
            raise InvalidJson(path, "contains a NUL character")
        return text
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidJson(path, "is not a finite number")
        return _number(number)
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value":
        return None
    if kind == "struct_value":
        return _object(value.struct_value, path, depth + 1, max_depth)
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise _TooDeep
        return [
            _value(item, f"{path}[{i}]", depth + 1, max_depth)
            for i, item in enumerate(value.list_value.values)
        ]
    raise InvalidJson(path, "has no value (a google.protobuf.Value with no kind set)")


def _number(value: float) -> float | int:
    # A whole double is an int, as far as a double is exact.
    if value.is_integer() and abs(value) <= _MAX_EXACT:
        return int(value)
    return value


def _key_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    # JSON's quoting keeps a NUL or a quote in the key readable.
    return f"{path}[{json.dumps(key)}]"
