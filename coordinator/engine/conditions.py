"""Conditional steps: a CEL expression over the saga's context and earlier outputs.

``StepSpec.when`` is a Common Expression Language expression (the language of
protovalidate and Kubernetes' admission policies) with two variables: ``context`` (the
saga's context) and ``steps`` (``steps.<name>.output`` for every completed step the
step depends on, directly or not). It is compiled when the saga starts (a syntax error,
or a variable other than those two, is refused there) and evaluated when the step
becomes ready: true dispatches it, false skips it (never run, never compensated, done
as far as its dependents are concerned), and anything else — an error, a value that is
not a boolean — fails the step for good with the message.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Mapping
from typing import Any

import cel

from coordinator.engine.errors import InvalidSpec

VARIABLES = frozenset({"context", "steps"})
"""What an expression may refer to."""


class ConditionFailed(ValueError):
    """The condition could not be evaluated to true or false; the text says why."""


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> cel.Program:
    # Sagas of one kind share their conditions: compile each once per process.
    return cel.compile(expression)


# A string literal (skipped, so that "steps.x" in quotes is no reference), or a step
# named after ``steps`` as a field (steps.create) or an index (steps["create"]).
_STEP_NAMES = re.compile(
    r"""(?P<string>[rRbB]{0,2}(?P<quote>"{3}|'{3}|"|')(?:\\.|(?!(?P=quote)).)*?(?P=quote))"""
    r"""|(?<![.\w])steps\s*\.\s*(?P<field>[A-Za-z_]\w*)"""
    r"""|(?<![.\w])steps\s*\[\s*(?P<q>["'])(?P<index>(?:\\.|(?!(?P=q)).)*)(?P=q)\s*\]""",
    re.DOTALL,
)


def step_names(expression: str) -> list[str]:
    """The steps the expression names (``steps.create``, ``steps["create"]``), in order."""
    found = []
    for match in _STEP_NAMES.finditer(expression):
        name = match.group("field") or match.group("index")
        if name is not None:
            found.append(name)
    return found


def check(
    field: str,
    expression: str,
    known: Collection[str] | None = None,
    all_steps: Collection[str] = (),
) -> None:
    """Raise :class:`InvalidSpec` naming ``field`` if the expression cannot be compiled,
    refers to a variable other than ``context`` and ``steps``, or (given ``known``, the
    steps this one depends on, directly or not) names a step outside ``known``: its
    output could not be there when the condition is evaluated."""
    try:
        program = _program(expression)
    except (ValueError, RuntimeError) as exc:
        raise InvalidSpec(field, f"is not a CEL expression: {_first_line(exc)}") from None
    unknown = sorted(set(program.variables()) - VARIABLES)
    if unknown:
        raise InvalidSpec(field, f"uses {', '.join(unknown)}: only context and steps are known")
    if known is None:
        return
    for name in step_names(expression):
        if name not in all_steps:
            raise InvalidSpec(field, f'steps.{name}: no step named "{name}"')
        if name not in known:
            raise InvalidSpec(
                field,
                f'steps.{name}: "{name}" is not a step this one depends on (directly or '
                "not), so its output may not exist yet",
            )


def holds(expression: str, context: Mapping[str, Any], outputs: Mapping[str, Any]) -> bool:
    """Evaluate the expression; :class:`ConditionFailed` unless it is true or false."""
    activation = {
        "context": dict(context),
        "steps": {name: {"output": output} for name, output in outputs.items()},
    }
    try:
        result = _program(expression).execute(activation)
    except Exception as exc:  # the library raises KeyError, TypeError, RuntimeError, ...
        raise ConditionFailed(f"when {expression!r}: {_first_line(exc)}") from None
    if not isinstance(result, bool):
        raise ConditionFailed(
            f"when {expression!r}: is {type(result).__name__} {result!r}, not true or false"
        )
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
