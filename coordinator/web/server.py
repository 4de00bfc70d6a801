"""The operator web page's HTTP server (``--http-listen``): every page is drawn from the
coordinator's own gRPC API, called through one :class:`~sagaplane.SagaClient`, so
validation, access control and history stay in one place (no second source of truth).

Routes::

    GET  /                         -> /sagas
    GET  /sagas                    the list, filtered (name, state..., created_after,
                                   created_before, page_size, page_token)
    GET  /sagas/live               the list's counts and table (what the page re-reads)
    GET  /sagas/{id}               one saga: timeline, graph, steps, history, context
    GET  /sagas/{id}/events        server-sent events fed by WatchSaga: the page's
                                   sections again after each transition
    POST /sagas/{id}/compensate    {"reason": ...}                      (Compensate)
    POST /sagas/{id}/resolve       {"resolution": ..., "reason": ...}   (ResolveCompensation)
    GET  /static/{file}            the page's script and stylesheet (package data)

Each call carries the caller's own token (:func:`_token`: a Bearer header, or the
password of HTTP Basic authentication, which the browser asks for after a 401), never
the page's: the API's access control decides what each person sees and does.

A refused call answers with the status it maps to (400 a bad field, 401 no or an unknown
token, 403 not allowed, 404 an unknown saga, 409 an illegal transition, 503 the API
unreachable) and a message; anything unexpected
is logged and answered 500 without a traceback. The POST routes only take JSON sent with
the ``X-Sagaplane-Request`` header from the same origin: a page on another site can
neither send that header without a CORS preflight (which is never granted) nor post
JSON from a form.

aiohttp (rather than the small HTTP/1.0 endpoint of ``sagaplane.metrics``): pages with
forms, POSTs and long-lived event streams need a complete, well-kept HTTP/1.1 parser,
keep-alive and streaming responses on the coordinator's own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import grpc
from aiohttp import web

from coordinator.web import pages
from sagaplane.client import SagaClient
from sagaplane.errors import (
    CoordinatorError,
    CoordinatorUnavailable,
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    ResourceExhausted,
    SagaNotFound,
)
from sagaplane.metrics import parse_listen
from sagaplane.sagas import Saga, SagaState

__all__ = ["REQUEST_HEADER", "WebServer"]

log = logging.getLogger(__name__)

REQUEST_HEADER = "X-Sagaplane-Request"
"""The header a POST must carry (the page's script sets it)."""

COUNT_CAP = 100
"""Counts by state stop at this many (shown as ``100+``): each is a ListSagas page."""

COUNTS_FRESH = 1.0
"""Seconds a count by state is answered again to other pages with the same filters."""

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
KEEPALIVE = 15.0
"""Seconds between comments on a quiet event stream (so proxies keep it open)."""

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_STATIC = {
    name: (kind, resources.files("coordinator.web").joinpath("static", name).read_bytes())
    for name, kind in (("web.js", "text/javascript"), ("web.css", "text/css"))
}
"""The page's script and stylesheet (package data), read once at import."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadQuery(Exception):
    """A query parameter or body field the page cannot use (answered 400)."""


class WebServer:
    """Serves the pages on ``listen`` (host:port, port 0 for a free one), reading and
    acting through ``client`` (connected to the coordinator's own API). The client is
    the caller's to close."""

    def __init__(self, client: SagaClient, listen: str) -> None:
        self._client = client
        self._host, self._port = parse_listen(listen)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._counting: dict[
            tuple[str, str, datetime | None, datetime | None],
            tuple[float, asyncio.Task[dict[str, int]]],
        ] = {}

    @property
    def port(self) -> int:
        """The port bound (useful with port 0)."""
        assert self._runner is not None, "start() first"
        for address in self._runner.addresses:
            return int(address[1])
        raise RuntimeError("not listening")

    async def start(self) -> None:
        """Bind and serve; OSError if the address cannot be bound."""
        app = web.Application(middlewares=[self._errors], client_max_size=64 * 1024)
        app.add_routes(
            [
                web.get("/", self._root),
                web.get("/sagas", self._list),
                web.get("/sagas/live", self._live),
                web.get("/sagas/{id}", self._saga),
                web.get("/sagas/{id}/events", self._events),
                web.post("/sagas/{id}/compensate", self._compensate),
                web.post("/sagas/{id}/resolve", self._resolve),
                web.get("/static/{name}", self._file),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port)
        await self._site.start()

    async def stop(self) -> None:
        """Stop listening and end the event streams. Safe to call twice."""
        for task in [*self._streams, *(t for _, t in self._counting.values())]:
            task.cancel()
        self._counting.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- plumbing ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self._refusal(request, exc.status, exc.reason)
        except BadQuery as exc:
            response = self._refusal(request, 400, str(exc))
        except CoordinatorError as exc:
            response = self._refusal(request, _status(exc), str(exc) or type(exc).__doc__ or "")
            if response.status == 401:
                # The browser asks for credentials, and sends them with every request
                # to this page from then on (the events stream and the actions too).
                response.headers["WWW-Authenticate"] = 'Basic realm="Sagaplane", charset="UTF-8"'
        except Exception:
            log.exception("web: %s %s failed", request.method, request.path)
            response = self._refusal(request, 500, "internal error (see the coordinator's log)")
        if not response.prepared:
            response.headers.update(_SECURITY_HEADERS)
        return response

    @staticmethod
    def _refusal(request: web.Request, status: int, message: str) -> web.Response:
        if request.method == "POST" or request.path.endswith("/events"):
            return web.json_response({"error": message}, status=status)
        return _html(pages.error_page(status, message), status=status)

    # -- pages ------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/sagas")

    async def _list(self, request: web.Request) -> web.StreamResponse:
        query, sagas, counts, more = await self._listing(request)
        html = pages.list_page(sagas, counts, query=query, next_token=more, cap=COUNT_CAP)
        return _html(html)

    async def _live(self, request: web.Request) -> web.StreamResponse:
        query, sagas, counts, more = await self._listing(request)
        return _html(pages.live_list(sagas, counts, query=query, next_token=more, cap=COUNT_CAP))

    async def _listing(
        self, request: web.Request
    ) -> tuple[dict[str, Any], list[Saga], dict[str, int], str]:
        query = _list_query(request)
        after, before = query.get("after"), query.get("before")
        token = _token(request)
        api = self._client.with_token(token)
        page = api.list_sagas(
            query["page_size"],
            query.get("page_token", ""),
            states=query["states"],
            name=query.get("name", ""),
            created_after=after,
            created_before=before,
        )
        found, counts = await asyncio.gather(
            page, self._counts(api, token or "", query.get("name", ""), after, before)
        )
        return query, found.sagas, counts, found.next_page_token

    async def _counts(
        self,
        api: SagaClient,
        token: str,
        name: str,
        after: datetime | None,
        before: datetime | None,
    ) -> dict[str, int]:
        """Sagas by state (up to COUNT_CAP + 1 each) for these filters. Lists open in
        several tabs by the same caller share one count: a count started less than
        COUNTS_FRESH seconds ago (or still running) is answered again."""
        now = asyncio.get_running_loop().time()
        for old in [
            k for k, (at, t) in self._counting.items() if t.done() and now - at > COUNTS_FRESH
        ]:
            del self._counting[old]
        key = (token, name, after, before)
        entry = self._counting.get(key)
        if entry is None or (entry[1].done() and (entry[1].cancelled() or entry[1].exception())):
            task = asyncio.create_task(
                self._count(api, name, after, before), name="sagaplane-web-count"
            )
            entry = self._counting[key] = (now, task)
        # Shielded: one page hanging up must not cancel the count the others await.
        return await asyncio.shield(entry[1])

    @staticmethod
    async def _count(
        api: SagaClient, name: str, after: datetime | None, before: datetime | None
    ) -> dict[str, int]:
        pages_by_state = await asyncio.gather(
            *(
                api.list_sagas(
                    COUNT_CAP + 1,
                    states=[state],
                    name=name,
                    created_after=after,
                    created_before=before,
                )
                for state in pages.LIST_STATES
            )
        )
        return {
            s.value: len(p.sagas) for s, p in zip(pages.LIST_STATES, pages_by_state, strict=True)
        }

    async def _saga(self, request: web.Request) -> web.StreamResponse:
        saga = await _api(self._client, request).get_saga(
            request.match_info["id"], include_history=True
        )
        return _html(pages.saga_page(saga, datetime.now(UTC)))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``saga`` (the sections, as JSON) after each transition,
        then ``end`` when the saga has ended. The browser's EventSource reconnects by
        itself after a cut; the stream then starts again from the saga as it is."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            return await self._stream(request)
        finally:
            self._streams.discard(task)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        updates: asyncio.Queue[Saga | BaseException | None] = asyncio.Queue(maxsize=16)
        pump = asyncio.create_task(
            _pump(_api(self._client, request).watch(request.match_info["id"]), updates),
            name="sagaplane-web-watch",
        )
        try:
            first = await updates.get()
            if isinstance(first, BaseException):
                raise first  # before any byte was sent: an ordinary refusal (404, 400)
            response = web.StreamResponse(
                headers={
                    **_SECURITY_HEADERS,
                    "Content-Type": "text/event-stream",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            item: Saga | BaseException | None = first
            while True:
                if item is None:
                    await response.write(b"event: end\ndata: {}\n\n")
                    break
                if isinstance(item, BaseException):
                    # The browser reconnects by itself: say why, once, and end.
                    if isinstance(item, CoordinatorError):
                        message = str(item) or type(item).__doc__ or ""
                    else:
                        log.error("web: watching %s failed", request.path, exc_info=item)
                        message = "internal error (see the coordinator's log)"
                    await response.write(_event("failure", {"error": message}))
                    break
                sections = pages.saga_sections(item, datetime.now(UTC))
                data = {"state": item.state.value, "sections": sections}
                await response.write(_event("saga", data))
                try:
                    async with asyncio.timeout(KEEPALIVE):
                        item = await updates.get()
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    item = await updates.get()
            return response
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    # -- actions ----------------------------------------------------------------------

    async def _compensate(self, request: web.Request) -> web.StreamResponse:
        body = await _action_body(request)
        reason = _text(body, "reason")
        saga = await _api(self._client, request).compensate(request.match_info["id"], reason)
        return web.json_response({"state": saga.state.value})

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        body = await _action_body(request)
        resolution = _text(body, "resolution")
        if resolution not in ("retry", "mark_compensated"):
            raise BadQuery("resolution: must be retry or mark_compensated")
        saga = await _api(self._client, request).resolve_compensation(
            request.match_info["id"], resolution, _text(body, "reason")
        )
        return web.json_response({"state": saga.state.value})

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound(reason=f"no file {name!r} here")
        kind, body = _STATIC[name]
        return web.Response(body=body, content_type=kind, charset="utf-8")


async def _pump(
    watch: AsyncIterator[Saga], into: asyncio.Queue[Saga | BaseException | None]
) -> None:
    # The stream is read by a task of its own, so the handler can wait on the queue with
    # a timeout (for keepalives) without cancelling the generator mid-read.
    try:
        async for saga in watch:
            await into.put(saga)
    except Exception as exc:  # the handler answers it (a CoordinatorError) or logs it
        await into.put(exc)
        return
    await into.put(None)


def _api(client: SagaClient, request: web.Request) -> SagaClient:
    """``client`` acting for the caller of ``request``: the API's access control decides
    what they may see and do (and records who they are)."""
    return client.with_token(_token(request))


def _token(request: web.Request) -> str | None:
    """The caller's API token: ``Authorization: Bearer TOKEN`` (scripts), or the password
    of HTTP Basic authentication (a browser asks for it after a 401; the user name is
    not used). None without one."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise BadQuery("Authorization: not valid Basic credentials") from None
        return decoded.partition(":")[2] or None
    return None


def _event(name: str, data: dict[str, Any]) -> bytes:
    # json.dumps never writes a raw newline, so the payload is one `data:` line.
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _html(text: str, *, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _status(exc: CoordinatorError) -> int:
    if exc.code is grpc.StatusCode.UNAUTHENTICATED:
        return 401
    if exc.code is grpc.StatusCode.PERMISSION_DENIED:
        return 403
    if isinstance(exc, InvalidArgument):
        return 400
    if isinstance(exc, SagaNotFound):
        return 404
    if isinstance(exc, IllegalTransition | IdempotencyConflict):
        return 409
    if isinstance(exc, CoordinatorUnavailable | ResourceExhausted):
        return 503
    return 502


def _list_query(request: web.Request) -> dict[str, Any]:
    """The list's filters from the query string; BadQuery naming a bad one."""
    params = request.query
    query: dict[str, Any] = {"states": []}
    for state in params.getall("state", []):
        if state not in {s.value for s in pages.LIST_STATES}:
            choices = ", ".join(s.value for s in pages.LIST_STATES)
            raise BadQuery(f"state: must be one of {choices}, not {state!r}")
        if state not in query["states"]:
            query["states"].append(state)
    query["states"] = [SagaState(s) for s in query["states"]]
    if params.get("name"):
        query["name"] = params["name"]
    for field, key in (("created_after", "after"), ("created_before", "before")):
        text = params.get(field, "").strip()
        if text:
            query[field] = text
            query[key] = _time(field, text)
    size = params.get("page_size", "")
    if size:
        if not size.isdigit() or not 1 <= int(size) <= MAX_PAGE_SIZE:
            raise BadQuery(f"page_size: must be a whole number from 1 to {MAX_PAGE_SIZE}")
        query["page_size"] = int(size)
    else:
        query["page_size"] = DEFAULT_PAGE_SIZE
    if params.get("page_token"):
        query["page_token"] = params["page_token"]
    return query


def _time(field: str, text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadQuery(
            f"{field}: not a date or time (ISO 8601, e.g. 2026-12-01T10:00Z): {text!r}"
        ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


async def _action_body(request: web.Request) -> dict[str, Any]:
    """The JSON body of a POST from this site's own page; 403 otherwise."""
    if request.headers.get(REQUEST_HEADER) != "1":
        raise web.HTTPForbidden(reason=f"actions need the {REQUEST_HEADER} header (the page's)")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(reason=f"actions are taken from this site only, not {origin}")
    if request.content_type != "application/json":
        raise BadQuery("the body must be JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        raise BadQuery("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadQuery("the body must be a JSON object")
    return body


def _text(body: dict[str, Any], field: str) -> str:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise BadQuery(f"{field}: must be a string")
    return value
