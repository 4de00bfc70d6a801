"""OpenTelemetry tracing of sagas, for the coordinator and participants alike.

One trace per saga, across every process: the trace context (W3C ``traceparent`` and
``tracestate``, as a *carrier*: a small ``dict[str, str]``) is taken from StartSaga's
gRPC metadata, stored with the saga, and carried by every command and reply in its
AMQP headers. A step attempt's span runs from its dispatch to the moment its reply is
applied, which may happen in another coordinator replica, or after a restart: so its
span id is not random but derived from the saga's trace and the command's message id
(:func:`child_carrier`), and any process can emit it (:func:`record`) with the
participant's handler span already under it.

Off unless configured, and then it costs nothing: without the ``[otel]`` extra
(``opentelemetry-sdk`` not importable), or without one of these set, every function
here returns at once (None, or a no-op context manager):

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (needs ``opentelemetry-exporter-otlp-proto-http``,
  or ``-proto-grpc`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; the exporter reads its
  own ``OTEL_EXPORTER_OTLP_*`` settings), ``console`` (spans printed to stdout, for
  debugging), ``none``; several separated by commas.
- ``SAGAPLANE_TRACES_FILE``: append each span as one JSON line (the
  keys of the SDK's ``ReadableSpan.to_json``, without events and links) to this file;
  for tests and the benchmark.

``OTEL_SERVICE_NAME`` names the process (by default the name given to
:func:`configure`); ``OTEL_BSP_*`` tune the batching of exports, ``OTEL_TRACES_SAMPLER``
the sampling, as everywhere in OpenTelemetry. A process that set up OpenTelemetry
itself (``opentelemetry-instrument``, or its own ``TracerProvider``) keeps its provider.

The maintained instrumentations, and where they fit: ``opentelemetry-instrumentation-grpc``
makes the coordinator's server spans (``coordinator.tracing``). ``-aio-pika`` does not
fit: it injects the *current* context when a message is published and starts a span per
publish and per consume, but our messages are published by the outbox relay, long
after (and in another task than) the transaction that wrote them, so the context must
travel in the outbox row, and the consumer's span must cover the inbox transaction,
not the library callback. ``-psycopg`` does not fit either: a span per statement of
the relay, timer and reply batches (most of them about many sagas, or none) would be
noise at a cost the benchmark's budget (20 %) cannot pay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Final

try:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )
except ImportError:  # the [otel] extra is not installed: tracing stays off
    AVAILABLE = False
else:
    AVAILABLE = True

__all__ = [
    "AVAILABLE",
    "TRACES_FILE_ENV",
    "carrier",
    "child_carrier",
    "configure",
    "current_ids",
    "derived_span_id",
    "enabled",
    "fail_current",
    "from_metadata",
    "outgoing",
    "record",
    "shutdown",
    "span",
]

log = logging.getLogger(__name__)

TRACES_FILE_ENV: Final = "SAGAPLANE_TRACES_FILE"
"""The environment variable naming a file that every span is appended to, as JSON."""

HEADERS: Final = ("traceparent", "tracestate")
"""The W3C trace context: what StartSaga's metadata, the saga row, and the AMQP headers
of commands and replies carry."""

_SCOPE: Final = "sagaplane"

_tracer: Any = None  # the Tracer once configure() turned tracing on
_provider: Any = None  # the TracerProvider configure() made (and shutdown() flushes)
# A span id that the next span started in this context must have (see record()).
_forced_span_id: ContextVar[int | None] = ContextVar("sagaplane_forced_span_id", default=None)


def enabled() -> bool:
    """Whether spans are being made in this process."""
    return _tracer is not None


def configure(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the environment asks for it (see the module docstring);
    whether it is on. Safe to call twice (the first configuration stays)."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    env = os.environ if env is None else env
    if not AVAILABLE:
        if env.get("OTEL_TRACES_EXPORTER", "none") != "none" or env.get(TRACES_FILE_ENV):
            log.warning(
                "tracing asked for, but OpenTelemetry is not installed: "
                "pip install 'sagaplane[otel]'"
            )
        return False
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # Set up by the program (or opentelemetry-instrument): used as it is, but the
        # step attempts' span ids must be the derived ones.
        current.id_generator = _IdGenerator()
        _tracer = current.get_tracer(_SCOPE)
        return True
    exporters = _exporters(env)
    if not exporters:
        return False
    name = env.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}), id_generator=_IdGenerator()
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer(_SCOPE)
    return True


def shutdown() -> None:
    """Export what is buffered and stop (at the end of the process). Safe to call twice."""
    global _tracer, _provider
    provider, _provider = _provider, None
    _tracer = None
    if provider is not None:
        provider.shutdown()


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id, in hex; None when there is none."""
    if _tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def carrier() -> dict[str, str] | None:
    """The current span's context as W3C headers; None when tracing is off or no span
    is current."""
    if _tracer is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    # W3C trace context written directly (what the tracecontext propagator writes, at a
    # fraction of the cost of the global propagator's round): only these two headers
    # travel with a saga (HEADERS), whatever propagators the program set up.
    found = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        found["tracestate"] = ctx.trace_state.to_header()
    return _bounded(found)


def _context_of(parent: Mapping[str, str]) -> Any:
    """The OpenTelemetry context of a carrier's span (its remote parent), as the W3C
    tracecontext propagator extracts it; an empty one (a span under it is a root, not a
    child of whatever is current) when it is malformed."""
    parsed = _parse(parent.get("traceparent", ""))
    if parsed is None:
        return Context()
    trace_id, span_id, flags = parsed
    state = parent.get("tracestate")
    remote = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


def outgoing() -> tuple[tuple[str, str], ...]:
    """The current span's W3C context as gRPC metadata, for a call this process makes;
    empty when no span is current. Works with any OpenTelemetry setup of the program's,
    whether or not :func:`configure` turned tracing on here."""
    if not AVAILABLE or not trace.get_current_span().get_span_context().is_valid:
        return ()
    found: dict[str, str] = {}
    propagate.inject(found)
    return tuple((k, v) for k, v in found.items() if k in HEADERS)


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str] | None:
    """The W3C trace context of gRPC metadata (or AMQP headers' items), if any and well
    formed; None otherwise."""
    if not metadata:
        return None
    found: dict[str, str] = {}
    for key, value in metadata:
        name = key.lower() if isinstance(key, str) else ""
        if name in HEADERS:
            if isinstance(value, bytes):
                value = value.decode("ascii", errors="replace")
            if isinstance(value, str):
                found[name] = value
    if _parse(found.get("traceparent", "")) is None:
        return None
    return _bounded(found)


MAX_TRACESTATE_CHARS: Final = 512
"""A longer ``tracestate`` (from a client: it is stored and sent with every command) is
dropped, as W3C allows (it sets 512 as what every vendor must at least carry)."""


def _bounded(found: dict[str, str]) -> dict[str, str]:
    if len(found.get("tracestate", "")) > MAX_TRACESTATE_CHARS:
        del found["tracestate"]
    return found


def child_carrier(parent: Mapping[str, str], key: str) -> dict[str, str] | None:
    """The context of the span identified by ``key`` (a command's message id) under
    ``parent``: same trace and flags, a span id derived from both. Every process gets
    the same answer, which is how the coordinator that applies a reply emits the span
    that the command's participant already put its handler span under. Pure: works
    whether or not tracing is on here."""
    parsed = _parse(parent.get("traceparent", ""))
    if parsed is None:
        return None
    trace_id, _, flags = parsed
    child = {"traceparent": f"00-{trace_id}-{derived_span_id(trace_id, key):016x}-{flags}"}
    if parent.get("tracestate"):
        child["tracestate"] = parent["tracestate"]
    return child


def derived_span_id(trace_id: str, key: str) -> int:
    """A span id (nonzero, 64 bits) that depends only on the trace and ``key``."""
    digest = hashlib.sha256(f"{trace_id}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
"""What the W3C tracecontext propagator accepts (its own pattern, lowercase hex only)."""


def _parse(traceparent: str) -> tuple[str, str, str] | None:
    """(trace id, span id, flags) of a traceparent, or None if W3C's tracecontext
    propagator would not take it: malformed, version ff, extra fields on version 00,
    all-zero ids, or longer than 512 characters."""
    if len(traceparent) > 512:
        return None
    found = _TRACEPARENT.match(traceparent)
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"}:
        return None
    if set(span_id) == {"0"}:
        return None
    return trace_id, span_id, flags


_KINDS: Final = ("internal", "server", "client", "producer", "consumer")


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    kind: str = "internal",
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[None]:
    """A span around the block, current inside it, under ``parent`` (a carrier; None:
    under the current span). Does nothing when tracing is off. An exception that leaves
    the block is recorded on the span and marks it failed."""
    if _tracer is None:
        yield
        return
    ctx = _context_of(parent) if parent is not None else None
    with _tracer.start_as_current_span(
        name, context=ctx, kind=_kind(kind), attributes=dict(attributes or {})
    ):
        yield


def fail_current(message: str) -> None:
    """Mark the current span failed with ``message`` (a handler's failure that the SDK
    answered rather than raised)."""
    if _tracer is None:
        return
    trace.get_current_span().set_status(Status(StatusCode.ERROR, message))


def record(
    name: str,
    *,
    parent: Mapping[str, str],
    key: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    attributes: Mapping[str, str | int] | None = None,
    error: str | None = None,
) -> None:
    """Emit a finished span under ``parent`` (a carrier) from ``start_ns`` to ``end_ns``
    (nanoseconds since the epoch; None: now). With ``key``, its span id is the one of
    :func:`child_carrier` for that key. Does nothing when tracing is off."""
    if _tracer is None:
        return
    ctx = _context_of(parent)
    token = None
    if key is not None:
        parsed = _parse(parent.get("traceparent", ""))
        if parsed is not None:
            token = _forced_span_id.set(derived_span_id(parsed[0], key))
    try:
        created = _tracer.start_span(
            name,
            context=ctx,
            kind=_kind("internal"),
            attributes=dict(attributes or {}),
            start_time=start_ns,
        )
    finally:
        if token is not None:
            _forced_span_id.reset(token)
    if error is not None:
        created.set_status(Status(StatusCode.ERROR, error))
    created.end(end_time=end_ns)


def _kind(name: str) -> Any:
    return {
        "internal": SpanKind.INTERNAL,
        "server": SpanKind.SERVER,
        "client": SpanKind.CLIENT,
        "producer": SpanKind.PRODUCER,
        "consumer": SpanKind.CONSUMER,
    }[name]


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    at = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{ns % 1_000_000_000 // 1000:06d}Z"


def _exporters(env: Mapping[str, str]) -> list[Any]:
    found: list[Any] = []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",")]
    for name in names:
        if name in ("", "none"):
            continue
        if name == "console":
            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            found.append(_otlp(env))
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)"
            )
    path = env.get(TRACES_FILE_ENV)
    if path:
        found.append(_FileExporter(path))
    return found


def _otlp(env: Mapping[str, str]) -> Any:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            return GrpcExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    except ImportError as exc:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER=otlp ({protocol}) needs the OTLP exporter: "
            "pip install 'sagaplane[otel]'"
        ) from exc


if AVAILABLE:
    # (Without the extra, mypy sees these bases as Any.)
    class _IdGenerator(RandomIdGenerator):  # type: ignore[misc, unused-ignore]
        """Random ids, except a span id that record() asked for."""

        def generate_span_id(self) -> int:
            forced = _forced_span_id.get()
            return forced if forced is not None else super().generate_span_id()

    class _FileExporter(SpanExporter):  # type: ignore[misc, unused-ignore]
        """Appends each span to a file as one line of JSON: the keys of the SDK's
        ``ReadableSpan.to_json`` (less events and links), written at a third of its
        cost (it runs beside the coordinator's work, on the same interpreter)."""

        def __init__(self, path: str) -> None:
            self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115
            self._lock = threading.Lock()
            self._resources: dict[int, str] = {}

        def _line(self, span: ReadableSpan) -> str:
            ctx, parent, status = span.context, span.parent, span.status
            resource = self._resources.get(id(span.resource))
            if resource is None:
                resource = json.dumps({"attributes": dict(span.resource.attributes)})
                self._resources[id(span.resource)] = resource
            entry = {
                "name": span.name,
                "context": {
                    "trace_id": f"0x{ctx.trace_id:032x}",
                    "span_id": f"0x{ctx.span_id:016x}",
                },
                "kind": str(span.kind),
                "parent_id": f"0x{parent.span_id:016x}" if parent is not None else None,
                "start_time": _iso(span.start_time),
                "end_time": _iso(span.end_time),
                "status": {
                    "status_code": status.status_code.name,
                    "description": status.description,
                },
                "attributes": dict(span.attributes or {}),
            }
            return f'{json.dumps(entry, default=str)[:-1]}, "resource": {resource}}}\n'

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            lines = "".join(self._line(s) for s in spans)
            with self._lock:
                if self._file.closed:
                    return SpanExportResult.FAILURE
                self._file.write(lines)
                self._file.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            with self._lock:
                self._file.close()
