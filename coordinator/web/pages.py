"""The operator pages as HTML: the list of sagas and one saga's page, drawn from
:class:`~sagaplane.sagas.Saga` views (what the gRPC API answered, nothing else).

Every value that comes from a saga (names, inputs, outputs, errors, reasons) goes
through :func:`e` (``html.escape``), so it shows as text whatever it holds. The pages use
no inline script or style (the server's Content-Security-Policy forbids both): bars and
boxes are SVG attributes, behaviour is ``/static/web.js``.

A saga's page is made of sections (:func:`saga_sections`) that the live stream sends
again, rendered by this same code, after each transition: one renderer, no second copy
in JavaScript.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from coordinator.web.timeline import Span, timeline
from sagaplane.sagas import Saga, SagaState, Step

__all__ = ["LIST_STATES", "e", "error_page", "list_page", "live_list", "saga_page", "saga_sections"]

LIST_STATES = tuple(s for s in SagaState if s is not SagaState.UNSPECIFIED)
"""The states the list can filter on and counts."""


def e(value: object) -> str:
    """``value`` as HTML text (quotes escaped too: safe in attributes)."""
    return escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · Sagaplane</title>"
        '<link rel=stylesheet href="/static/web.css">'
        '<script src="/static/web.js" defer></script></head>'
        '<body><header><a href="/sagas" class=brand>Sagaplane</a></header>'
        f"<main>{body}</main></body></html>\n"
    )


def _when(at: datetime | None) -> str:
    if at is None:
        return ""
    text = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return f"<time datetime={e(at.isoformat())}>{e(text)}</time>"


def _state(state: str) -> str:
    return f'<span class="state st-{e(state)}">{e(state)}</span>'


def _json(value: Any) -> str:
    return f"<pre class=json>{e(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"


# -- the list ------------------------------------------------------------------------


def list_page(
    sagas: Sequence[Saga],
    counts: Mapping[str, int],
    *,
    query: Mapping[str, Any],
    next_token: str,
    cap: int,
) -> str:
    """The list of sagas with its filter form; ``query`` the filters as given (name,
    states, created_after, created_before, page_size)."""
    chosen = set(query.get("states", ()))
    options = "".join(
        f"<label class=check><input type=checkbox name=state value={e(s)}"
        f"{' checked' if s in chosen else ''}> {e(s)}</label>"
        for s in LIST_STATES
    )
    form = (
        '<form method=get action="/sagas" class=filters>'
        f'<label>Name <input name=name value="{e(query.get("name", ""))}"></label>'
        f'<label>Created after <input name=created_after placeholder="2026-12-01T10:00Z" '
        f'value="{e(query.get("created_after", ""))}"></label>'
        f'<label>before <input name=created_before value="{e(query.get("created_before", ""))}">'
        f"</label><fieldset><legend>States</legend>{options}</fieldset>"
        "<button type=submit>Filter</button></form>"
    )
    live_src = "/sagas/live?" + urlencode(_query_pairs(query, page_token=query.get("page_token")))
    body = (
        f"<h1>Sagas</h1>{form}"
        f'<div id=live data-live-src="{e(live_src)}">'
        f"{live_list(sagas, counts, query=query, next_token=next_token, cap=cap)}</div>"
    )
    return _page("Sagas", body)


def live_list(
    sagas: Sequence[Saga],
    counts: Mapping[str, int],
    *,
    query: Mapping[str, Any],
    next_token: str,
    cap: int,
) -> str:
    """The part of the list page that refreshes itself: counts by state, the table."""
    facets = []
    for state in LIST_STATES:
        n = counts.get(state, 0)
        shown = f"{cap}+" if n > cap else str(n)
        href = "/sagas?" + urlencode(_query_pairs({**query, "states": [state]}))
        facets.append(
            f'<li><a href="{e(href)}" data-state={e(state)}>{_state(state)} '
            f"<b class=count>{e(shown)}</b></a></li>"
        )
    rows = "".join(_row(s) for s in sagas) or (
        "<tr><td colspan=6 class=empty>No saga matches.</td></tr>"
    )
    more = ""
    if next_token:
        href = "/sagas?" + urlencode(_query_pairs(query, page_token=next_token))
        more = f'<p class=more><a href="{e(href)}" rel=next>Next page</a></p>'
    return (
        f"<ul class=counts>{''.join(facets)}</ul>"
        "<table class=sagas><thead><tr><th>Saga</th><th>Name</th><th>State</th>"
        "<th>Steps done</th><th>Created</th><th>Updated</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{more}"
    )


def _row(saga: Saga) -> str:
    done = sum(1 for s in saga.steps if s.status.value in ("completed", "skipped"))
    return (
        f'<tr data-saga="{e(saga.id)}"><td><a href="/sagas/{quote(saga.id, safe="")}">'
        f"{e(saga.id)}</a></td><td>{e(saga.name)}</td><td>{_state(saga.state)}</td>"
        f"<td>{done}/{len(saga.steps)}</td><td>{_when(saga.created_at)}</td>"
        f"<td>{_when(saga.updated_at)}</td></tr>"
    )


def _query_pairs(query: Mapping[str, Any], *, page_token: str | None = None) -> list[Any]:
    pairs: list[tuple[str, str]] = []
    for key in ("name", "created_after", "created_before", "page_size"):
        if query.get(key):
            pairs.append((key, str(query[key])))
    pairs += [("state", s) for s in query.get("states", ())]
    if page_token:
        pairs.append(("page_token", page_token))
    return pairs


# -- one saga ------------------------------------------------------------------------


def saga_page(saga: Saga, now: datetime) -> str:
    """A saga's page: its sections, the live stream's address, the confirm dialogs."""
    sections = "".join(
        f'<section id="{e(name)}">{html}</section>'
        for name, html in saga_sections(saga, now).items()
    )
    sid = quote(saga.id, safe="")
    body = (
        f'<div id=saga data-saga="{e(saga.id)}" data-events="/sagas/{sid}/events">'
        f"{sections}</div>{_dialogs(saga)}"
    )
    return _page(f"{saga.name} {saga.id}", body)


def saga_sections(saga: Saga, now: datetime) -> dict[str, str]:
    """The page's sections by element id; the live stream sends these again."""
    return {
        "summary": _summary(saga),
        "timeline": _timeline(saga, now),
        "graph": _graph(saga.steps),
        "steps": _steps(saga.steps),
        "history": _history(saga),
        "context": f"<h2>Context</h2>{_json(saga.context)}",
    }


def _summary(saga: Saga) -> str:
    buttons = []
    if saga.state is SagaState.STARTED:
        buttons.append("<button type=button class=danger data-open=compensate>Compensate</button>")
    if saga.state is SagaState.COMPENSATION_FAILED:
        buttons.append("<button type=button data-open=resolve>Resolve compensation</button>")
    facts = [
        ("Id", e(saga.id)),
        ("State", _state(saga.state)),
        ("Created", _when(saga.created_at)),
        ("Updated", _when(saga.updated_at)),
    ]
    if saga.completed_at:
        facts.append(("Ended", _when(saga.completed_at)))
    if saga.idempotency_key:
        facts.append(("Idempotency key", e(saga.idempotency_key)))
    if saga.deadline_at:
        facts.append(("Deadline", _when(saga.deadline_at)))
    failed = saga.failed_step
    if failed is not None:
        facts.append(
            ("Failed step", f"{e(failed.name)}: <span class=error>{e(failed.error)}</span>")
        )
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    return (
        f"<h1>{e(saga.name)} {_state(saga.state)}</h1>"
        f"<dl class=facts>{dl}</dl><p class=actions>{''.join(buttons)}</p>"
        "<p class=live-status data-live-status>live</p>"
    )


_BAR_HEIGHT = 18


def _timeline(saga: Saga, now: datetime) -> str:
    line = timeline(saga, now)
    by_step: dict[str, list[Span]] = {}
    for span in line.spans:
        by_step.setdefault(span.step, []).append(span)
    rows = []
    for step in saga.steps:
        bars = []
        for span in by_step.get(step.name, []):
            x = line.offset(span.start)
            width = max(line.offset(span.end) - x, 0.6)
            seconds = (span.end - span.start).total_seconds()
            label = f"{span.kind} attempt {span.attempt}: {span.outcome}, {seconds * 1000:.0f} ms"
            if span.reason:
                label += f" — {span.reason}"
            mark = ""
            if span.attempt > 1:
                mark = (
                    f'<text x="{min(x + width, 99):.2f}%" y="13" class=retry-mark>'
                    f"#{span.attempt}</text>"
                )
            bars.append(
                f'<rect x="{x:.2f}%" y="3" width="{width:.2f}%" height="{_BAR_HEIGHT - 6}" '
                f'rx="2" class="bar {e(span.kind)} {e(span.outcome)}" '
                f'data-kind="{e(span.kind)}" data-outcome="{e(span.outcome)}">'
                f"<title>{e(label)}</title></rect>{mark}"
            )
        if step.name in line.skipped:
            bars.append('<text x="0" y="13" class=skipped-mark>skipped</text>')
        rows.append(
            f'<tr data-step="{e(step.name)}"><th>{e(step.name)}</th>'
            f"<td>{_state(step.status)}</td>"
            f'<td class=track><svg width="100%" height="{_BAR_HEIGHT}" role=img '
            f'aria-label="{e(step.name)}">{"".join(bars)}</svg></td></tr>'
        )
    total = (line.end - line.start).total_seconds()
    legend = (
        '<p class=legend><span class="key execute succeeded"></span>action '
        '<span class="key compensate succeeded"></span>compensation '
        '<span class="key retried"></span>failed, retried '
        '<span class="key failed"></span>failed '
        '<span class="key running"></span>in flight</p>'
    )
    return (
        f"<h2>Timeline <small>{total:.3f} s from {_when(line.start)}</small></h2>{legend}"
        f"<table class=timeline>{''.join(rows)}</table>"
    )


_NODE_W, _NODE_H, _GAP_X, _GAP_Y = 150, 30, 50, 14


def _graph(steps: Sequence[Step]) -> str:
    """The dependency graph, when the steps are not simply one after another."""
    names = [s.name for s in steps]
    chain = all(s.depends_on == ((names[i - 1],) if i else ()) for i, s in enumerate(steps))
    if chain:
        return ""
    depth = _depths(steps)
    columns: dict[int, list[str]] = {}
    for step in steps:
        columns.setdefault(depth[step.name], []).append(step.name)
    place: dict[str, tuple[int, int]] = {}
    for col, members in columns.items():
        for row, name in enumerate(members):
            place[name] = (col * (_NODE_W + _GAP_X), row * (_NODE_H + _GAP_Y))
    width = (max(columns) + 1) * (_NODE_W + _GAP_X) - _GAP_X
    height = max(len(m) for m in columns.values()) * (_NODE_H + _GAP_Y) - _GAP_Y
    edges = []
    for step in steps:
        x2, y2 = place[step.name]
        for dep in step.depends_on:
            if dep not in place:
                continue
            x1, y1 = place[dep]
            edges.append(
                f'<line x1="{x1 + _NODE_W}" y1="{y1 + _NODE_H // 2}" x2="{x2}" '
                f'y2="{y2 + _NODE_H // 2}" class=edge />'
            )
    nodes = []
    for step in steps:
        x, y = place[step.name]
        nodes.append(
            f'<g class="node st-{e(step.status)}" data-step="{e(step.name)}">'
            f'<rect x="{x}" y="{y}" width="{_NODE_W}" height="{_NODE_H}" rx="4" />'
            f'<text x="{x + 8}" y="{y + 19}">{e(_clip(step.name, 18))}</text>'
            f"<title>{e(step.name)}: {e(step.status)}</title></g>"
        )
    return (
        f'<h2>Dependencies</h2><svg class=graph width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role=img aria-label="step dependencies">'
        f"{''.join(edges)}{''.join(nodes)}</svg>"
    )


def _depths(steps: Sequence[Step]) -> dict[str, int]:
    """Each step's column: the longest path to it from a step without dependencies."""
    needs = {s.name: [d for d in s.depends_on if d != s.name] for s in steps}
    depth: dict[str, int] = {}

    def of(name: str, seen: frozenset[str]) -> int:
        if name not in depth:
            # The coordinator refuses cycles; `seen` only keeps a bad answer from looping.
            ups = [d for d in needs.get(name, []) if d in needs and d not in seen]
            depth[name] = 1 + max((of(d, seen | {name}) for d in ups), default=-1)
        return depth[name]

    for name in needs:
        of(name, frozenset())
    return depth


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _steps(steps: Iterable[Step]) -> str:
    rows = []
    for step in steps:
        output = _json(step.output) if step.output is not None else ""
        error = f"<p class=error>{e(step.error)}</p>" if step.error else ""
        if step.delivery_problem:
            # Why a step waits: its command reached no queue (no participant for it).
            error += f"<p class=error>{e(step.delivery_problem)}</p>"
        rows.append(
            f'<tr data-step="{e(step.name)}"><td>{e(step.name)}</td><td>{e(step.action)}'
            f"<br><small>{e(step.compensation or '')}</small></td><td>{_state(step.status)}</td>"
            f"<td>{step.attempts}/{step.compensation_attempts}</td>"
            f"<td>{e(', '.join(step.depends_on))}</td>"
            f"<td>{_json(step.input)}</td><td>{output}{error}</td></tr>"
        )
    return (
        "<h2>Steps</h2><table class=steps><thead><tr><th>Step</th><th>Action / undo</th>"
        "<th>Status</th><th>Attempts (action/undo)</th><th>Depends on</th><th>Input</th>"
        f"<th>Output</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _history(saga: Saga) -> str:
    rows = "".join(
        f"<tr data-position={h.position}><td>{_when(h.at)}</td><td>{e(h.event)}</td>"
        f"<td>{e(h.step_name)}</td><td>{_state(h.from_state)} → {_state(h.to_state)}</td>"
        f"<td>{e(h.reason)}</td></tr>"
        for h in saga.history
    )
    return (
        "<h2>History</h2><table class=history><thead><tr><th>At</th><th>Event</th>"
        f"<th>Step</th><th>State</th><th>Reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _dialogs(saga: Saga) -> str:
    sid = quote(saga.id, safe="")
    return (
        f'<dialog id=compensate data-post="/sagas/{sid}/compensate"><form method=dialog>'
        f"<h2>Compensate {e(saga.name)}?</h2>"
        "<p>Every completed step is undone, newest first. This cannot be taken back.</p>"
        "<label>Reason <input name=reason maxlength=1000></label>"
        "<p class=dialog-error data-error></p>"
        "<menu><button value=cancel formnovalidate>Cancel</button>"
        "<button value=confirm class=danger data-confirm>Compensate</button></menu>"
        "</form></dialog>"
        f'<dialog id=resolve data-post="/sagas/{sid}/resolve"><form method=dialog>'
        f"<h2>Resolve the compensation of {e(saga.name)}</h2>"
        "<label><input type=radio name=resolution value=retry checked> Retry the failed "
        "compensation (its cause was fixed)</label>"
        "<label><input type=radio name=resolution value=mark_compensated> Mark it "
        "compensated (undone by hand) and go on</label>"
        "<label>Reason (recorded) <input name=reason required maxlength=1000></label>"
        "<p class=dialog-error data-error></p>"
        "<menu><button value=cancel formnovalidate>Cancel</button>"
        "<button value=confirm data-confirm>Resolve</button></menu></form></dialog>"
    )


def error_page(status: int, message: str) -> str:
    """A page that says what went wrong (``message`` shown as text)."""
    return _page(
        f"Error {status}",
        f"<h1>Error {status}</h1><p class=error>{e(message)}</p>"
        '<p><a href="/sagas">All sagas</a></p>',
    )
