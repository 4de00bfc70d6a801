"""Log lines (sagaplane.logs): the saga's fields, JSON lines, and no passwords (issue 20,
item 3)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sagaplane import logs, tracing
from sagaplane.urls import redact


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """What the root logger prints, through logs.configure (restored after)."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved
    root.setLevel(level)


def _configure(stream: io.StringIO, format: str) -> logging.Logger:
    logs.configure(logging.INFO, format, stream=stream)
    return logging.getLogger("sagaplane.test")


def test_json_lines_carry_the_fields_of_the_saga_being_handled(output: io.StringIO) -> None:
    log = _configure(output, "json")
    with logs.about("01JSAGA", "charge", 2):
        log.info("charging %s", "card")
    log.warning("no saga here")
    log.info("explicit", extra=logs.fields("01JOTHER", "reserve", 1))
    first, second, third = (json.loads(line) for line in output.getvalue().splitlines())
    assert first["message"] == "charging card"
    assert (first["saga_id"], first["step"], first["attempt"]) == ("01JSAGA", "charge", 2)
    assert first["level"] == "INFO" and first["logger"] == "sagaplane.test"
    assert first["time"].endswith("+00:00")
    assert "saga_id" not in second and second["level"] == "WARNING"
    assert (third["saga_id"], third["step"], third["attempt"]) == ("01JOTHER", "reserve", 1)


def test_json_lines_carry_the_current_trace() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFields())
    log = logging.getLogger("sagaplane.test.trace")
    log.addHandler(handler)
    log.propagate = False
    # As configure() would, with a provider of the test's own.
    provider = TracerProvider()
    tracing._tracer = provider.get_tracer("test")
    try:
        with tracing.span("handle"):
            ids = tracing.current_ids()
            log.warning("inside")
    finally:
        tracing._tracer = None
        log.removeHandler(handler)
    assert ids is not None
    line = json.loads(stream.getvalue())
    assert (line["trace_id"], line["span_id"]) == ids


def test_a_traceback_stays_inside_its_json_line(output: io.StringIO) -> None:
    log = _configure(output, "json")
    try:
        raise ValueError("cannot use amqp://app:hunter2@mq.example/")
    except ValueError:
        log.exception("failed")
    [line] = output.getvalue().splitlines()
    entry = json.loads(line)
    assert "ValueError" in entry["exception"]
    assert "hunter2" not in line and "amqp://app:***@mq.example/" in entry["exception"]


def test_text_lines_stay_readable_with_the_fields_at_the_end(output: io.StringIO) -> None:
    log = _configure(output, "text")
    with logs.about("01JSAGA", "charge", 1):
        log.info("charged")
    log.info("plain")
    first, second = output.getvalue().splitlines()
    assert first.endswith("INFO sagaplane.test charged [saga_id=01JSAGA step=charge attempt=1]")
    assert second.endswith("INFO sagaplane.test plain")


@pytest.mark.parametrize("format", logs.FORMATS)
def test_no_password_reaches_a_line(output: io.StringIO, format: str) -> None:
    log = _configure(output, format)
    log.warning("connecting to %s", "postgresql://app:s3cr@t@db.example:5432/sagas")
    log.warning("dsn %s", "host=db.example user=app password=hunter2 dbname=x")
    text = output.getvalue()
    assert "s3cr" not in text and "hunter2" not in text
    assert "postgresql://app:***@db.example:5432/sagas" in text
    if format == "json":
        for line in text.splitlines():
            json.loads(line)


def test_configure_refuses_an_unknown_format(output: io.StringIO) -> None:
    with pytest.raises(ValueError, match="text, json"):
        logs.configure(logging.INFO, "xml", stream=output)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("postgresql://postgres@127.0.0.1/sagaplane", "postgresql://postgres@127.0.0.1/sagaplane"),
        (
            "error at 'amqps://u:p%40ss@h:5671/v' and postgresql://a:b@c/d",
            "error at 'amqps://u:***@h:5671/v' and postgresql://a:***@c/d",
        ),
    ],
)
def test_urls_are_masked_anywhere_in_a_text(url: str, shown: str) -> None:
    assert redact(url) == shown
