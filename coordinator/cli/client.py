"""The client commands: start, get, list, compensate, watch, resolve, health.

They call the coordinator's gRPC API with the generated stubs (so that every field of a
request, e.g. a retry policy in a saga file, gets through) and translate its errors,
through the SDK's error tree, into messages and exit statuses in one place
(:func:`_translate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from sagaplane.client import TERMINAL_STATES
from sagaplane.errors import (
    CoordinatorError,
    CoordinatorUnavailable,
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    SagaNotFound,
    from_rpc_error,
)
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc, saga_pb2

START_EPILOG = """\
The file holds the StartSaga request, in JSON or YAML (by its extension; - reads stdin
as YAML, which also reads JSON). Its fields are the request's, as grpcurl -d takes them:

  name: order.place
  context: {customer: c-1}
  idempotency_key: order-1001        # optional: starting twice returns the same saga
  steps:
    - {name: create, action: orders.create, compensation: orders.delete,
       input: {sku: book, qty: 2}}
    - {name: charge, action: payment.charge, compensation: payment.refund,
       input: {amount: 42}}

A file holding only a list of steps works too, with --name.
"""

_R = TypeVar("_R")


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


class Remote:
    """A channel to the coordinator and the calls the commands make."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self._timeout = timeout if timeout > 0 else None
        self._channel = grpc.aio.insecure_channel(target)
        self.sagas = coordinator_pb2_grpc.SagaCoordinatorServiceStub(self._channel)
        self.health = health_pb2_grpc.HealthStub(self._channel)

    async def call(self, method: Callable[..., Awaitable[_R]], request: object) -> _R:
        """One call with the deadline; errors become the SDK's CoordinatorError tree."""
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    async def get(self, saga_id: str, *, history: bool = False) -> saga_pb2.Saga:
        """GetSaga."""
        request = coordinator_pb2.GetSagaRequest(id=saga_id, include_history=history)
        return (await self.call(self.sagas.GetSaga, request)).saga

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


@asynccontextmanager
async def connect(target: str, deadline: float, saga_id: str = "") -> AsyncIterator[Remote]:
    """A :class:`Remote` whose calls each get ``deadline`` seconds, with the coordinator's
    errors turned into :class:`CliError`."""
    remote = Remote(target, deadline)
    try:
        yield remote
    except CoordinatorError as exc:
        raise _translate(exc, target, saga_id) from exc
    finally:
        await remote.close()


def _translate(exc: CoordinatorError, target: str, saga_id: str) -> CliError:
    if isinstance(exc, SagaNotFound):
        return CliError(f"no saga with id {saga_id!r}", ExitCode.NOT_FOUND)
    if isinstance(exc, CoordinatorUnavailable):
        return CliError(
            f"cannot reach the coordinator at {target} ({exc.message}).\n"
            "Is it running? Start one with `sagaplane serve`, or point --coordinator "
            "(SAGAPLANE_COORDINATOR) at it.",
            ExitCode.UNAVAILABLE,
        )
    if isinstance(exc, InvalidArgument):
        return CliError(f"the coordinator refused the request: {exc.message}", ExitCode.USAGE)
    if isinstance(exc, IllegalTransition | IdempotencyConflict):
        return CliError(f"refused: {exc.message}", ExitCode.REFUSED)
    return CliError(f"the coordinator answered with an error: {exc.message}")


def _print(text: str) -> None:
    print(text, flush=True)


# -- start ------------------------------------------------------------------------------


def load_saga_file(path: str) -> dict[str, Any]:
    """The StartSaga request in a JSON or YAML file (``-``: stdin) as a JSON object."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE) from exc
    try:
        # YAML reads JSON too, but JSON's own parser gives JSON files clearer errors.
        # safe_load builds plain data, never objects.
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CliError(f"{path} is not valid JSON or YAML: {exc}", ExitCode.USAGE) from exc
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, dict):
        raise CliError(
            f"{path} must hold an object (the StartSaga request) or a list of steps",
            ExitCode.USAGE,
        )
    try:
        # YAML has values JSON lacks (dates, for one); the request only carries JSON.
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{path} holds a value that is not JSON: {exc}", ExitCode.USAGE) from exc
    return data


def start_request(
    data: dict[str, Any], args: argparse.Namespace
) -> coordinator_pb2.StartSagaRequest:
    """The request: the file's fields, with --name and --idempotency-key on top."""
    if args.name is not None:
        data["name"] = args.name
    if args.idempotency_key is not None:
        data["idempotency_key"] = args.idempotency_key
    try:
        return json_format.ParseDict(data, coordinator_pb2.StartSagaRequest())
    except json_format.ParseError as exc:
        raise CliError(f"{args.file}: {exc}", ExitCode.USAGE) from exc


def start(args: argparse.Namespace) -> int:
    """``sagaplane start FILE``."""
    request = start_request(load_saga_file(args.file), args)
    return _run(_start(args, request))


async def _start(args: argparse.Namespace, request: coordinator_pb2.StartSagaRequest) -> int:
    async with connect(args.coordinator, args.timeout) as remote:
        saga = (await remote.call(remote.sagas.StartSaga, request)).saga
        if not args.watch:
            _print(render.dumps(render.to_json(saga)) if args.json else render.saga_text(saga))
            return ExitCode.OK
        if not args.json:
            _print(f"started saga {saga.id} ({saga.name})")
        return await _follow(remote, saga.id, args, hoped=saga_pb2.SAGA_STATE_COMPLETED)


# -- get, list --------------------------------------------------------------------------


def get(args: argparse.Namespace) -> int:
    """``sagaplane get ID``."""
    return _run(_get(args))


async def _get(args: argparse.Namespace) -> int:
    async with connect(args.coordinator, args.timeout, args.id) as remote:
        saga = await remote.get(args.id, history=args.history)
    _print(
        render.dumps(render.to_json(saga))
        if args.json
        else render.saga_text(saga, history=args.history)
    )
    return ExitCode.OK


def list_active(args: argparse.Namespace) -> int:
    """``sagaplane list``."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1", ExitCode.USAGE)
    return _run(_list(args))


async def _list(args: argparse.Namespace) -> int:
    sagas: list[saga_pb2.Saga] = []
    more = False
    async with connect(args.coordinator, args.timeout) as remote:
        token = ""
        while len(sagas) < args.limit:
            request = coordinator_pb2.ListActiveRequest(
                page_size=min(args.limit - len(sagas), 1000), page_token=token, name=args.name
            )
            if args.stale_for is not None:
                request.stale_for.FromTimedelta(args.stale_for)
            page = await remote.call(remote.sagas.ListActive, request)
            sagas += page.sagas
            token = page.next_page_token
            if not token:
                break
        more = bool(token)
    if args.json:
        _print(render.dumps([render.to_json(s) for s in sagas]))
    elif sagas:
        _print(render.sagas_table(sagas, datetime.now(UTC)))
    else:
        _print("no active sagas" + (f" named {args.name!r}" if args.name else ""))
    if more:
        print(f"(the newest {len(sagas)} only; raise --limit for more)", file=sys.stderr)
    return ExitCode.OK


# -- compensate, watch ------------------------------------------------------------------


def compensate(args: argparse.Namespace) -> int:
    """``sagaplane compensate ID``."""
    return _run(_compensate(args))


async def _compensate(args: argparse.Namespace) -> int:
    async with connect(args.coordinator, args.timeout, args.id) as remote:
        request = coordinator_pb2.CompensateRequest(id=args.id, reason=args.reason)
        saga = (await remote.call(remote.sagas.Compensate, request)).saga
        if not args.watch:
            _print(render.dumps(render.to_json(saga)) if args.json else render.saga_text(saga))
            return ExitCode.OK
        return await _follow(remote, saga.id, args, hoped=saga_pb2.SAGA_STATE_COMPENSATED)


def watch(args: argparse.Namespace) -> int:
    """``sagaplane watch ID``."""
    return _run(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    async with connect(args.coordinator, args.timeout, args.id) as remote:
        return await _follow(remote, args.id, args, hoped=saga_pb2.SAGA_STATE_COMPLETED)


async def _follow(remote: Remote, saga_id: str, args: argparse.Namespace, *, hoped: int) -> int:
    """Follow until the saga ends; 0 if it ended ``hoped``, else NOT_AS_HOPED."""
    show = None if args.json else _print
    try:
        saga = await follow(
            remote, saga_id, interval=args.interval, max_wait=args.max_wait, show=show
        )
    except TimeoutError:
        raise CliError(
            f"saga {saga_id} has not ended after {args.max_wait:g}s", ExitCode.TIMEOUT
        ) from None
    if args.json:
        _print(render.dumps(render.to_json(saga)))
    else:
        _print("")
        _print(render.step_table(saga))
    return ExitCode.OK if saga.state == hoped else ExitCode.NOT_AS_HOPED


async def follow(
    remote: Remote,
    saga_id: str,
    *,
    interval: float = 0.2,
    max_wait: float = 0.0,
    show: Callable[[str], None] | None = None,
    indent: str = "",
) -> saga_pb2.Saga:
    """Poll the saga (with history) until it ends, showing each new transition once.

    Returns the final saga; raises TimeoutError after ``max_wait`` seconds (0: never).
    """
    seen = 0
    start: datetime | None = None
    async with asyncio.timeout(max_wait if max_wait > 0 else None):
        while True:
            saga = await remote.get(saga_id, history=True)
            if show is not None:
                if seen == 0:
                    show(f"{indent}saga {saga.id} ({saga.name})")
                if saga.history and start is None:
                    start = render.timestamp(saga.history[0].at)
                for entry in saga.history[seen:]:
                    show(indent + history_line(entry, start))
            seen = len(saga.history)
            if saga.state in TERMINAL_STATES:
                if show is not None:
                    took = _took(saga, start)
                    show(f"{indent}-> {render.saga_state(saga.state)}{took}")
                return saga
            await asyncio.sleep(interval)


def history_line(entry: saga_pb2.HistoryEntry, start: datetime | None) -> str:
    """One transition on one line, as ``watch`` prints it while it happens: the time
    since the saga started, the event, its step, the saga's state when it changed, and
    the reason given."""
    changed = entry.from_state != entry.to_state
    parts = [
        f"  {render.elapsed(entry, start):>9}  {entry.event:<24} {entry.step_name or '':<10}",
        render.transition(entry) if changed else "",
        f"({entry.reason})" if entry.reason else "",
    ]
    return "  ".join(p for p in parts if p).rstrip()


def _took(saga: saga_pb2.Saga, start: datetime | None) -> str:
    end = render.timestamp(saga.completed_at) or (
        render.timestamp(saga.history[-1].at) if saga.history else None
    )
    if start is None or end is None:
        return ""
    return f" after {(end - start).total_seconds():.3f}s"


# -- resolve ----------------------------------------------------------------------------


def resolve(args: argparse.Namespace) -> int:
    """``sagaplane resolve ID --retry|--mark-compensated --reason WHY``."""
    return _run(_resolve(args))


async def _resolve(args: argparse.Namespace) -> int:
    resolution = (
        coordinator_pb2.COMPENSATION_RESOLUTION_RETRY
        if args.retry
        else coordinator_pb2.COMPENSATION_RESOLUTION_MARK_COMPENSATED
    )
    request = coordinator_pb2.ResolveCompensationRequest(
        id=args.id, resolution=resolution, reason=args.reason
    )
    async with connect(args.coordinator, args.timeout, args.id) as remote:
        saga = (await remote.call(remote.sagas.ResolveCompensation, request)).saga
    _print(render.dumps(render.to_json(saga)) if args.json else render.saga_text(saga))
    return ExitCode.OK


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d`` or plain seconds, as argparse ``type``."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 1d)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return timedelta(seconds=seconds)


# -- health -----------------------------------------------------------------------------


def health(args: argparse.Namespace) -> int:
    """``sagaplane health``."""
    return _run(_health(args))


async def _health(args: argparse.Namespace) -> int:
    async with connect(args.coordinator, args.timeout) as remote:
        reply = await remote.call(remote.health.Check, health_pb2.HealthCheckRequest())
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    _print(render.dumps({"status": status}) if args.json else status)
    return (
        ExitCode.OK
        if reply.status == health_pb2.HealthCheckResponse.SERVING
        else ExitCode.UNAVAILABLE
    )
