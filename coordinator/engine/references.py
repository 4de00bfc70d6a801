"""References in a step's input to what earlier steps returned (pure; no I/O).

A string value of a step's input that is exactly ``${steps.<name>.output.<path>}`` or
``${context.<path>}`` is replaced, when the step is dispatched, by the value found
there (any JSON type: a number stays a number). ``<path>`` is dot-separated keys,
and may be left out (``${steps.create.output}`` is the whole output). Only the outputs
of steps this one depends on, directly or not, can be referred to: they are the ones
known to have completed when it runs. A string that merely contains such text is left
as it is.

What the references bring in is bounded (:data:`MAX_RESOLVED_BYTES`, the size an input
may have): an input of 64 KiB could otherwise name one 64 KiB output two thousand
times, and make a command, a row and a GetSaga answer of 128 MB.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.engine.errors import InvalidSpec

_REFERENCE = re.compile(
    r"\$\{(?:steps\.(?P<step>.+?)\.output|(?P<context>context))(?P<path>(?:\.[^.{}]+)*)\}"
)


@dataclass(frozen=True)
class Reference:
    """One ``${...}`` of an input, and where in the input it stands."""

    where: str
    """Its place in the input, e.g. ``input.order.id``."""
    text: str
    """As written, e.g. ``${steps.create.output.order_id}``."""
    step: str | None
    """The step whose output it names; None for the context."""
    path: tuple[str, ...]
    """The keys to follow from there."""


MAX_RESOLVED_BYTES = 64 * 1024
"""What one step's references may bring into its input, as compact UTF-8 JSON: as much
as an input may hold (a whole output of the usual kind, or many small values)."""


class MissingValue(ValueError):
    """A reference names a value that is not there, or the values come to more than
    :data:`MAX_RESOLVED_BYTES` (the step fails for good)."""


def find(value: Any, where: str = "input") -> Iterator[Reference]:
    """Every reference in a JSON value, depth first."""
    if isinstance(value, str):
        match = _REFERENCE.fullmatch(value)
        if match is not None:
            path = tuple(match["path"].split(".")[1:]) if match["path"] else ()
            yield Reference(where, value, match["step"], path)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from find(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from find(item, f"{where}[{i}]")


def check(field: str, value: Any, known: set[str], step_names: set[str]) -> None:
    """Raise :class:`InvalidSpec` (naming the place under ``field``) for a reference to
    a step that is not in ``known`` (the steps this one depends on, directly or not)."""
    if not has_any(value):
        return
    for ref in find(value, field):
        if ref.step is None:
            continue
        if ref.step not in step_names:
            raise InvalidSpec(ref.where, f'{ref.text}: no step named "{ref.step}"')
        if ref.step not in known:
            raise InvalidSpec(
                ref.where,
                f'{ref.text}: "{ref.step}" is not a step this one depends on (directly or '
                "not), so its output may not exist yet",
            )


def resolve(
    value: Any,
    context: Mapping[str, Any],
    outputs: Mapping[str, Any],
    where: str = "input",
    *,
    budget: int = MAX_RESOLVED_BYTES,
    over_budget: str | None = None,
) -> Any:
    """``value`` with every reference replaced; :class:`MissingValue` names the first
    that points at nothing, or the one that takes what they bring in past ``budget``
    bytes (``over_budget`` then says why, instead of naming the budget). ``outputs``
    are the completed steps' outputs, by name."""
    return _Resolver(context, outputs, budget, over_budget).resolve(value, where)


class _Resolver:
    """One input's resolution, with what its references may still bring in."""

    def __init__(
        self,
        context: Mapping[str, Any],
        outputs: Mapping[str, Any],
        budget: int,
        over_budget: str | None,
    ) -> None:
        self.context = context
        self.outputs = outputs
        self.left = budget
        self.over_budget = (
            over_budget or f"the input's references bring in more than {budget} bytes"
        )

    def resolve(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            refs = list(find(value, where))
            if not refs:
                return value
            (ref,) = refs
            found = self.lookup(ref, value, where)
            # Each value is bounded (a part of one output, or of the context), so
            # measuring it is too; the budget stops a value named many times.
            size = len(json.dumps(found, separators=(",", ":"), ensure_ascii=False).encode())
            self.left -= size
            if self.left < 0:
                raise MissingValue(f"{where}: {value}: {self.over_budget}")
            return found
        if isinstance(value, Mapping):
            return {key: self.resolve(item, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return value

    def lookup(self, ref: Reference, value: str, where: str) -> Any:
        if ref.step is None:
            found: Any = self.context
            origin = "the context"
        elif ref.step in self.outputs:
            found = self.outputs[ref.step]
            origin = f'the output of "{ref.step}"'
        else:
            raise MissingValue(f'{where}: {value}: "{ref.step}" has not completed')
        walked = []
        for key in ref.path:
            walked.append(key)
            if not isinstance(found, Mapping) or key not in found:
                raise MissingValue(f"{where}: {value}: {origin} has no {'.'.join(walked)}")
            found = found[key]
        return found


def has_any(value: Any) -> bool:
    """Whether the value holds a reference (most inputs hold none: this is the cheap
    look every dispatch makes, so it walks plain JSON without recursion or ABCs)."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is str:
            if item.startswith("${") and _REFERENCE.fullmatch(item) is not None:
                return True
        elif kind is dict:
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
    return False
