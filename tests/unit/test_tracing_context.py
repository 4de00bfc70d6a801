"""The pure parts of sagaplane.tracing: trace contexts carried by sagas and messages, and
tracing that stays off unless configured (issue 20, item 2)."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaplane import tracing

PARENT = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=x",
}


def test_a_commands_context_is_a_child_every_process_derives_alike() -> None:
    child = tracing.child_carrier(PARENT, "01JSTEP:execute:1")
    assert child is not None
    version, trace_id, span_id, flags = child["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id == f"{tracing.derived_span_id(trace_id, '01JSTEP:execute:1'):016x}"
    assert span_id != "b7ad6b7169203331"
    assert child["tracestate"] == "vendor=x"
    assert tracing.child_carrier(PARENT, "01JSTEP:execute:1") == child
    other = tracing.child_carrier(PARENT, "01JSTEP:execute:2")
    assert other is not None and other["traceparent"] != child["traceparent"]


def test_malformed_contexts_are_ignored() -> None:
    for bad in (
        "",
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
    ):
        assert tracing.child_carrier({"traceparent": bad}, "k") is None
        assert tracing.from_metadata([("traceparent", bad)]) is None


def test_metadata_and_amqp_headers_give_their_trace_context() -> None:
    metadata = [("user-agent", "grpc"), ("TraceParent", PARENT["traceparent"].encode())]
    assert tracing.from_metadata(metadata) == {"traceparent": PARENT["traceparent"]}
    assert tracing.from_metadata(PARENT.items()) == PARENT
    assert tracing.from_metadata(None) is None
    # A client's tracestate is stored and sent with every command: a huge one is dropped.
    huge = [("traceparent", PARENT["traceparent"]), ("tracestate", "v=" + "x" * 600)]
    assert tracing.from_metadata(huge) == {"traceparent": PARENT["traceparent"]}


def test_unconfigured_tracing_does_nothing() -> None:
    assert not tracing.configure("test", env={})
    assert not tracing.enabled()
    with tracing.span("nothing", parent=PARENT):
        assert tracing.carrier() is None
        assert tracing.current_ids() is None
    tracing.record("nothing", parent=PARENT, key="k")
    tracing.shutdown()


def test_contexts_are_read_and_written_as_the_w3c_propagator_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # sagaplane.tracing reads and writes traceparent/tracestate itself (the global
    # propagator's round cost a third of a handler span): the same as W3C's propagator.
    w3c = TraceContextTextMapPropagator()
    for parent in (PARENT, {"traceparent": PARENT["traceparent"]}, {**PARENT, "traceparent":
                   "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}):  # fmt: skip
        ours = trace.get_current_span(tracing._context_of(parent)).get_span_context()
        theirs = trace.get_current_span(w3c.extract(parent)).get_span_context()
        assert ours == theirs
        monkeypatch.setattr(tracing, "_tracer", object())  # "tracing is on"
        with trace.use_span(trace.NonRecordingSpan(ours)):
            written: dict[str, str] = {}
            w3c.inject(written)
            assert tracing.carrier() == written
    # Malformed: a root, not a child of whatever span is current.
    assert (
        not trace.get_current_span(tracing._context_of({"traceparent": "x"}))
        .get_span_context()
        .is_valid
    )
