"""A saga's steps as a graph: who depends on whom (pure; no I/O).

A step runs once every step it depends on is done; a step that says nothing depends on
the step before it, so a saga of steps that say nothing is the straight line it always
was. Compensations run the other way: a step is undone only after every step that
depends on it, directly or not, has been undone (or had nothing to undo).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.engine.errors import InvalidSpec
from coordinator.engine.model import Step, StepSpec


class InvalidGraph(InvalidSpec):
    """The steps' dependencies are not a graph the engine can run; the message names the
    field (``steps[2].depends_on[0]: no step named "x"``)."""


def resolve(specs: Sequence[StepSpec]) -> tuple[tuple[int, ...] | None, ...]:
    """Each step's dependencies as positions (None: the step before, the default).

    Raises :class:`InvalidGraph` for an unknown name, a step depending on itself, a
    name given twice, or a cycle (the message names the steps on it).
    """
    if all(spec.depends_on is None for spec in specs):
        return (None,) * len(specs)  # one after another: no graph to check
    positions = {spec.name: i for i, spec in enumerate(specs)}
    resolved: list[tuple[int, ...] | None] = []
    for i, spec in enumerate(specs):
        if spec.depends_on is None:
            resolved.append(None)
            continue
        found: list[int] = []
        for j, name in enumerate(spec.depends_on):
            field = f"steps[{i}].depends_on[{j}]"
            if name not in positions:
                raise InvalidGraph(field, f'no step named "{name}"')
            if name == spec.name:
                raise InvalidGraph(field, "a step cannot depend on itself")
            if positions[name] in found:
                raise InvalidGraph(field, f'"{name}" is given twice')
            found.append(positions[name])
        resolved.append(tuple(found))
    cycle = _cycle([_deps(resolved, i) for i in range(len(specs))])
    if cycle:
        names = " -> ".join(specs[i].name for i in [*cycle, cycle[0]])
        raise InvalidGraph("steps", f"the dependencies form a cycle (each needs the next): {names}")
    return tuple(resolved)


@dataclass(frozen=True)
class Shape:
    """The dependency structure of a saga's steps, by position."""

    deps: tuple[tuple[int, ...], ...]
    """The steps each one waits for."""
    ancestors: tuple[frozenset[int], ...]
    """Every step each one depends on, directly or through others."""
    descendants: tuple[frozenset[int], ...]
    """Every step that depends on each one, directly or through others."""


def shape(steps: Sequence[Step]) -> Shape:
    """The shape of ``steps`` (computed once per distinct shape: sagas of one kind share
    it, and every transition asks)."""
    return _shape(tuple(s.depends_on for s in steps))


@functools.lru_cache(maxsize=1024)
def _shape(resolved: tuple[tuple[int, ...] | None, ...]) -> Shape:
    deps = tuple(_deps(resolved, i) for i in range(len(resolved)))
    children: list[set[int]] = [set() for _ in deps]
    for i, parents in enumerate(deps):
        for d in parents:
            children[d].add(i)
    return Shape(
        deps=deps,
        ancestors=tuple(_closure([set(p) for p in deps])),
        descendants=tuple(_closure(children)),
    )


def dependencies(steps: Sequence[Step], i: int) -> tuple[int, ...]:
    """The positions step ``i`` waits for."""
    return shape(steps).deps[i]


def descendants(steps: Sequence[Step]) -> list[frozenset[int]]:
    """For each step, every step that depends on it, directly or through others."""
    return list(shape(steps).descendants)


def ancestors(resolved: Sequence[tuple[int, ...] | None]) -> list[frozenset[int]]:
    """For each step (its dependencies as :func:`resolve` gives them), every step it
    depends on, directly or through others."""
    return list(_shape(tuple(resolved)).ancestors)


def _closure(edges: Sequence[set[int]]) -> list[frozenset[int]]:
    """For each node, every node reachable from it along ``edges``."""
    found: list[frozenset[int] | None] = [None] * len(edges)

    def reach(i: int) -> frozenset[int]:
        known = found[i]
        if known is None:
            # Acyclic (checked at start), so the recursion ends; sagas are small.
            known = frozenset(edges[i]).union(*(reach(j) for j in edges[i]))
            found[i] = known
        return known

    return [reach(i) for i in range(len(edges))]


def _deps(resolved: Sequence[tuple[int, ...] | None], i: int) -> tuple[int, ...]:
    given = resolved[i]
    if given is not None:
        return given
    return (i - 1,) if i > 0 else ()


def _cycle(deps: Sequence[tuple[int, ...]]) -> list[int]:
    """The steps of one dependency cycle, in order, or [] if there is none."""
    # Iterative depth-first search: white (unseen), grey (on the path), black (done).
    state = [0] * len(deps)
    for root in range(len(deps)):
        if state[root]:
            continue
        path: list[int] = []
        stack: list[tuple[int, int]] = [(root, 0)]
        while stack:
            node, k = stack.pop()
            if k == 0:
                state[node] = 1
                path.append(node)
            if k < len(deps[node]):
                stack.append((node, k + 1))
                nxt = deps[node][k]
                if state[nxt] == 1:
                    return path[path.index(nxt) :]
                if state[nxt] == 0:
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                path.pop()
    return []
