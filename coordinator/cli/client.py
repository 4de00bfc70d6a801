"""The client commands: start, get, list, compensate, watch, resolve, health.

They call the coordinator through :class:`sagaplane.SagaClient` (``start`` hands it the
saga file as the whole StartSaga request, so that every field, e.g. a retry policy,
gets through) and translate its errors, through the SDK's error tree, into messages and
exit statuses in one place (:func:`_translate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml

from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from sagaplane import backoff, durations
from sagaplane.client import Resolution, SagaClient, parse_start_request, tls_credentials
from sagaplane.errors import (
    ConfigurationError,
    CoordinatorError,
    CoordinatorUnavailable,
    IdempotencyConflict,
    IllegalTransition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SagaNotFound,
    Unauthenticated,
)
from sagaplane.sagas import Saga, SagaState, StepStatus
from sagaplane.v1 import coordinator_pb2, saga_pb2

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

A step waits for the one before it unless it names others (depends_on: [create]) or
none (depends_on_nothing: true); steps whose dependencies are done run side by side.
when: "context.gift == true" (CEL) runs a step only when it holds; false skips it.
Durations (timeout, step_timeout, a retry policy's intervals) are 10s, 1m30s,
10 seconds, 500ms or a number of seconds. A file holding only a list of steps works
too, with --name.
"""


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


@asynccontextmanager
async def connect(args: argparse.Namespace, saga_id: str = "") -> AsyncIterator[SagaClient]:
    """A :class:`SagaClient` to ``--coordinator`` whose calls each get ``--timeout``
    seconds (0: none), over TLS and with a token when the flags say so, with the
    coordinator's errors turned into :class:`CliError`."""
    async with connect_to(
        args.coordinator,
        args.timeout,
        credentials=_credentials(args),
        token=args.token or None,
        server_name=args.tls_server_name,
        saga_id=saga_id,
    ) as client:
        yield client


@asynccontextmanager
async def connect_to(
    target: str,
    deadline: float,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    server_name: str | None = None,
    saga_id: str = "",
) -> AsyncIterator[SagaClient]:
    """A :class:`SagaClient` to ``target`` (one address or several replicas, see
    :mod:`sagaplane.targets`) whose calls each get ``deadline`` seconds (0: none), with
    the coordinator's errors turned into :class:`CliError` (as :func:`connect`, for a
    program that has no command line of its own)."""
    try:
        client = SagaClient(
            target,
            timeout=deadline if deadline > 0 else None,
            credentials=credentials,
            token=token,
            server_name=server_name,
        )
    except ConfigurationError as exc:
        raise CliError(f"--coordinator (SAGAPLANE_COORDINATOR): {exc}", ExitCode.USAGE) from exc
    try:
        yield client
    except CoordinatorError as exc:
        raise _translate(exc, target, saga_id) from exc
    finally:
        await client.close()


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls, --tls-ca, --client-cert, --client-key and
    --tls-server-name (None: plaintext)."""
    if not (args.tls or args.tls_ca or args.client_cert or args.client_key or args.tls_server_name):
        return None
    try:
        return tls_credentials(args.tls_ca, cert=args.client_cert, key=args.client_key)
    except ValueError as exc:
        raise CliError(f"--client-cert and --client-key: {exc}", ExitCode.USAGE) from exc
    except OSError as exc:
        raise CliError(
            f"cannot read {exc.filename}: {exc.strerror or exc}", ExitCode.USAGE
        ) from exc


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
    if isinstance(exc, Unauthenticated):
        return CliError(
            f"the coordinator does not know who you are ({exc.message}).\n"
            "Pass a token it knows with --token (SAGAPLANE_TOKEN).",
            ExitCode.DENIED,
        )
    if isinstance(exc, PermissionDenied):
        return CliError(f"not allowed: {exc.message}", ExitCode.DENIED)
    if isinstance(exc, IllegalTransition | IdempotencyConflict):
        return CliError(f"refused: {exc.message}", ExitCode.REFUSED)
    return CliError(f"the coordinator answered with an error: {exc.message}")


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
    _require_name(data, args.file)
    try:
        return parse_start_request(data)
    except InvalidArgument as exc:
        raise CliError(f"{args.file}: {exc.message}", ExitCode.USAGE) from exc


def _require_name(data: dict[str, Any], path: str) -> None:
    """A saga needs a name; say where to give it rather than the coordinator's
    ``name: is required``."""
    if data.get("name"):
        return
    if set(data) == {"steps"}:
        raise CliError(
            f"{path} holds only a list of steps, and a saga needs a name: add `name: ...` "
            "(with the steps under `steps:`), or pass --name NAME",
            ExitCode.USAGE,
        )
    raise CliError(
        f"{path} gives the saga no name: add `name: ...`, or pass --name NAME", ExitCode.USAGE
    )


def start(args: argparse.Namespace) -> int:
    """``sagaplane start FILE``."""
    _watch_flags_need_watch(args)
    request = start_request(load_saga_file(args.file), args)
    return _run(_start(args, request))


async def _start(args: argparse.Namespace, request: coordinator_pb2.StartSagaRequest) -> int:
    async with connect(args) as client:
        reply = await client.start_saga_reply(request)
        saga = reply.saga
        if not args.json:
            say(_started_line(saga, replayed=reply.replayed))
        if not args.watch:
            if not args.json:
                say("")
            _show(saga, args)
            return ExitCode.OK
        return await _follow(client, saga.id, args, hoped=SagaState.COMPLETED)


def _started_line(saga: Saga, *, replayed: bool) -> str:
    """What ``start`` says first: that it started the saga, or that the idempotency key
    had started it before (nothing new was started), and when, and where it is now."""
    if not replayed:
        return f"started saga {saga.id} ({saga.name})"
    return (
        f"saga {saga.id} ({saga.name}) was already started with idempotency key "
        f"{saga.idempotency_key!r}, at {render.when(saga.proto.created_at)}; nothing new "
        f"was started. It is {saga.state.value}."
    )


def _show(saga: Saga, args: argparse.Namespace, *, history: bool = False) -> None:
    if args.json:
        say(render.dumps(render.to_json(saga.proto)))
    else:
        say(render.saga_text(saga.proto, history=history))


# -- get, list --------------------------------------------------------------------------


def get(args: argparse.Namespace) -> int:
    """``sagaplane get ID``."""
    return _run(_get(args))


async def _get(args: argparse.Namespace) -> int:
    async with connect(args, args.id) as client:
        saga = await client.get_saga(args.id, include_history=args.history)
    _show(saga, args, history=args.history)
    return ExitCode.OK


def list_active(args: argparse.Namespace) -> int:
    """``sagaplane list``."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1", ExitCode.USAGE)
    return _run(_list(args))


async def _list(args: argparse.Namespace) -> int:
    everything = args.all or bool(args.state) or args.since is not None
    if everything and args.stale_for is not None:
        raise CliError(
            "--stale-for lists active sagas only: leave out --all, --state and --since",
            ExitCode.USAGE,
        )
    since = datetime.now(UTC) - args.since if args.since is not None else None
    sagas: list[saga_pb2.Saga] = []
    more = False
    async with connect(args) as client:
        token = ""
        while len(sagas) < args.limit:
            size = min(args.limit - len(sagas), 1000)
            if everything:
                page = await client.list_sagas(
                    size, token, states=args.state, name=args.name, created_after=since
                )
            else:
                page = await client.list_active(size, token, args.name, stale_for=args.stale_for)
            sagas += [s.proto for s in page.sagas]
            token = page.next_page_token
            if not token:
                break
        more = bool(token)
    if args.json:
        say(render.dumps([render.to_json(s) for s in sagas]))
    elif sagas:
        say(render.sagas_table(sagas, datetime.now(UTC)))
    else:
        kind = "sagas" if everything else "active sagas"
        say(f"no {kind}" + (f" named {args.name!r}" if args.name else ""))
    if more:
        print(f"(the newest {len(sagas)} only; raise --limit for more)", file=sys.stderr)
    return ExitCode.OK


# -- compensate, watch ------------------------------------------------------------------


DEFAULT_INTERVAL = 0.2
"""Seconds before the first reconnection of a followed saga's stream (then backing off),
unless --interval says otherwise. The coordinator pushes transitions: nothing polls."""


def _watch_flags_need_watch(args: argparse.Namespace) -> None:
    """--max-wait and --interval of start and compensate mean nothing without --watch:
    refuse them rather than ignore them."""
    given = [flag for flag in ("max_wait", "interval") if getattr(args, flag) is not None]
    if given and not args.watch:
        flags = " and ".join("--" + flag.replace("_", "-") for flag in given)
        raise CliError(
            f"{flags} only {'apply' if len(given) > 1 else 'applies'} with --watch: "
            "add --watch, or leave it out",
            ExitCode.USAGE,
        )


def compensate(args: argparse.Namespace) -> int:
    """``sagaplane compensate ID``."""
    _watch_flags_need_watch(args)
    return _run(_compensate(args))


async def _compensate(args: argparse.Namespace) -> int:
    async with connect(args, args.id) as client:
        try:
            saga = await client.compensate(args.id, args.reason)
        except IllegalTransition:
            await _explain_compensation_failed(client, args.id)
            raise
        if not args.watch:
            _show(saga, args)
            return ExitCode.OK
        return await _follow(client, saga.id, args, hoped=SagaState.COMPENSATED)


async def _explain_compensation_failed(client: SagaClient, saga_id: str) -> None:
    """Compensate refused a saga in compensation_failed: the coordinator's message names
    its RPC (ResolveCompensation); say what to type instead."""
    saga = await client.get_saga(saga_id)
    if saga.state is not SagaState.COMPENSATION_FAILED:
        return
    stuck = next((s.name for s in saga.steps if s.status is StepStatus.COMPENSATION_FAILED), None)
    where = f" (step {stuck!r})" if stuck else ""
    raise CliError(
        f"refused: saga {saga_id} is compensation_failed: a compensation failed{where} and "
        "needs a person. Once its cause is fixed, retry it with\n"
        f"  sagaplane resolve {saga_id} --retry --reason WHY\n"
        "or, if it was undone by hand, go on with the older steps' compensations with\n"
        f"  sagaplane resolve {saga_id} --mark-compensated --reason WHY",
        ExitCode.REFUSED,
    )


def watch(args: argparse.Namespace) -> int:
    """``sagaplane watch ID``."""
    return _run(_watch(args))


async def _watch(args: argparse.Namespace) -> int:
    async with connect(args, args.id) as client:
        return await _follow(client, args.id, args, hoped=SagaState.COMPLETED)


async def _follow(
    client: SagaClient, saga_id: str, args: argparse.Namespace, *, hoped: SagaState
) -> int:
    """Follow until the saga ends; 0 if it ended ``hoped``, else NOT_AS_HOPED."""
    show = None if args.json else say
    interval = DEFAULT_INTERVAL if args.interval is None else args.interval
    max_wait = args.max_wait or 0.0
    try:
        saga = await follow(
            client, saga_id, interval=interval, max_wait=max_wait, show=show, notify=_notify
        )
    except TimeoutError:
        raise CliError(
            f"saga {saga_id} has not ended after {max_wait:g}s", ExitCode.TIMEOUT
        ) from None
    if args.json:
        say(render.dumps(render.to_json(saga.proto)))
    else:
        say("")
        say(render.step_table(saga.proto))
    return ExitCode.OK if saga.state == hoped else ExitCode.NOT_AS_HOPED


def _notify(text: str) -> None:
    print(f"sagaplane: {text}", file=sys.stderr, flush=True)


async def follow(
    client: SagaClient,
    saga_id: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    max_wait: float = 0.0,
    show: Callable[[str], None] | None = None,
    indent: str = "",
    notify: Callable[[str], None] | None = None,
) -> Saga:
    """Follow the saga (:meth:`SagaClient.watch`, the WatchSaga stream) until it ends,
    showing each transition once, as the coordinator pushes it.

    Once the saga was seen, a coordinator that cannot be reached (restarted, say) is
    waited for: the client reconnects after a :func:`sagaplane.backoff.delay` (from
    ``interval`` seconds), resuming the stream after the last entry it showed, and
    ``notify`` is told when the coordinator was lost and when it is back. A stream cut
    off for reading too slowly resumes the same way. Before the saga was seen,
    CoordinatorUnavailable is raised at once (a wrong address stays an error).

    Returns the final saga, with its whole history; raises TimeoutError after
    ``max_wait`` seconds (0: never).
    """
    history: list[saga_pb2.HistoryEntry] = []
    start: datetime | None = None
    saga: Saga | None = None
    failures = 0
    events = render.EVENT_WIDTH
    async with asyncio.timeout(max_wait if max_wait > 0 else None):
        while saga is None or not saga.ended:
            last = history[-1].position if history else 0
            try:
                async for saga in client.watch(saga_id, after_position=last, history=False):
                    if failures and notify is not None:
                        notify(f"the coordinator at {client.target} is back")
                    failures = 0
                    entries = list(saga.proto.history)
                    if show is not None:
                        if not history:
                            show(f"{indent}saga {saga.id} ({saga.name})")
                            events = render.event_width(entries)
                        if entries and start is None:
                            start = render.timestamp(entries[0].at)
                        width = max((len(s.name) for s in saga.proto.steps), default=0)
                        for entry in entries:
                            line = history_line(entry, start, step_width=width, event_width=events)
                            show(indent + line)
                    history += entries
                    if saga.ended:  # compensation_failed too: the stream would wait on
                        break
            except (CoordinatorUnavailable, ResourceExhausted) as exc:
                if saga is None:
                    raise
                failures += 1
                if failures == 1 and notify is not None:
                    notify(
                        f"lost the coordinator at {client.target} ({exc.message}); "
                        "reconnecting until it is back"
                    )
                # A new channel next time: the old one may wait out gRPC's own (long)
                # reconnection backoff.
                await client.close()
                await asyncio.sleep(backoff.delay(failures, initial=interval, maximum=5.0))
    final = saga_pb2.Saga()
    final.CopyFrom(saga.proto)
    del final.history[:]
    final.history.extend(history)
    if show is not None:
        show(f"{indent}-> {render.saga_state(final.state)}{_took(final, start)}")
    return Saga.from_proto(final)


def history_line(
    entry: saga_pb2.HistoryEntry,
    start: datetime | None,
    *,
    step_width: int = 10,
    event_width: int = render.EVENT_WIDTH,
) -> str:
    """One transition on one line, as ``watch`` prints it while it happens: the time
    since the saga started, the event (in a column ``event_width`` wide), its step (in
    a column as wide as the saga's longest step name), the saga's state when it
    changed, and the reason given."""
    changed = entry.from_state != entry.to_state
    width = max(step_width, 10)
    parts = [
        f"  {render.elapsed(entry, start):>9}  {entry.event:<{event_width}} "
        f"{entry.step_name or '':<{width}}",
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
    resolution = Resolution.RETRY if args.retry else Resolution.MARK_COMPENSATED
    async with connect(args, args.id) as client:
        saga = await client.resolve_compensation(args.id, resolution, args.reason)
    _show(saga, args)
    return ExitCode.OK


def parse_duration(text: str) -> timedelta:
    """A duration as :func:`sagaplane.durations.parse_duration` reads it (``90s``, ``15m``,
    ``2h``, ``1d``, ``1m30s``, plain seconds), as argparse ``type``."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- health -----------------------------------------------------------------------------


def health(args: argparse.Namespace) -> int:
    """``sagaplane health``."""
    return _run(_health(args))


async def _health(args: argparse.Namespace) -> int:
    async with connect(args) as client:
        status = await client.health()
    say(render.dumps({"status": status}) if args.json else status)
    return ExitCode.OK if status == "SERVING" else ExitCode.UNAVAILABLE
