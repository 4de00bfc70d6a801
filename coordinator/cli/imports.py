"""``sagaplane import FILE``: many sagas from one file, sent as StartSagas chunks.

The file is JSON Lines (one StartSaga request per line), a YAML or JSON list of them,
or CSV rows that fill a saga template (``--template order.yaml``): a string of the
template that is exactly ``${row.qty}`` becomes that column's value (``${row.qty:number}``
a number; also ``:int``, ``:bool``, ``:json``), one with more around it takes the text
(``"order-${row.id}"``). Only ``${row.…}`` is filled: the engine's ``${steps.…}`` and
``${context.…}`` references pass through untouched, for the coordinator to resolve.

Every row is read and checked before the first call. A chunk is one StartSagas call, so
it is written whole or not at all: a chunk with a malformed row is not sent, and a chunk
the coordinator refuses writes nothing; the other chunks go on, and each bad row is
reported with its line. Runs are resumable: a row without an idempotency key gets
``import:<import id>:<line>``, where the import id is a digest of the file (and the
template), so running the same import again (after Ctrl-C, an outage, or with rows
fixed and ``--import-id``) replays what was started and starts the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import hashlib
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from coordinator.api.validation import MAX_BATCH, MAX_BATCH_BYTES
from coordinator.cli import render
from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from sagaplane.client import SagaClient, parse_start_request
from sagaplane.errors import (
    CoordinatorError,
    FieldViolation,
    IdempotencyConflict,
    InvalidArgument,
)
from sagaplane.v1 import coordinator_pb2

IMPORT_EPILOG = """\
formats (by the file's extension, or --format; --csv is --format csv):
  .jsonl, .ndjson  one StartSaga request per line, as JSON (as `sagaplane start` takes it)
  .yaml, .yml      a list of StartSaga requests
  .json            a list of StartSaga requests
  .csv             a header line, then rows; each row fills --template

In the template, a string that is exactly ${row.COLUMN} takes the column's text;
${row.COLUMN:number} (or :int, :bool, :json) converts it; text around a placeholder
makes it part of a string. ${steps...} and ${context...} are left for the coordinator:

  name: order.place
  idempotency_key: order-${row.order_id}     # optional: else import:<import id>:<line>
  context: {customer: "${row.customer}"}
  steps:
    - {name: create, action: orders.create, input: {qty: "${row.qty:int}"}}
    - {name: charge, action: payment.charge,
       input: {order: "${steps.create.output.order_id}"}}

Run the same import again to resume it: what was started is replayed, not started twice.
"""

SAFE_BATCH_BYTES = MAX_BATCH_BYTES - 64 * 1024
"""A chunk is cut before its request would reach this many bytes (the coordinator's
limit, less room for the batch's own framing)."""

_PLACEHOLDER = re.compile(r"\$\{row\.([^}:]+)(?::(str|number|int|bool|json))?\}")
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".yaml": "yaml", ".yml": "yaml"}
_FORMATS |= {".json": "json", ".csv": "csv"}
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off", ""}


class RowError(ValueError):
    """A row cannot become a StartSaga request; the message says why."""


@dataclass(frozen=True, kw_only=True)
class Row:
    """One saga to start, or why it cannot be."""

    number: int
    """Its line in the file (1-based; for a YAML or JSON list, its item number)."""
    where: str
    """How the summary names it: ``line 17`` or ``item 3``."""
    request: coordinator_pb2.StartSagaRequest | None = None
    error: str | None = None
    """Why it cannot be sent (then ``request`` is None)."""


@dataclass
class Summary:
    """What an import did; printed at its end (and when it is interrupted)."""

    file: str
    import_id: str
    rows: int
    started: int = 0
    replayed: int = 0
    not_started: int = 0
    """Rows of a chunk that was not written because of another row."""
    failed: list[tuple[Row, str]] = field(default_factory=list)
    """Rows with their error, in file order."""
    notes: list[str] = field(default_factory=list)
    conflicts: int = 0
    calls: int = 0
    """StartSagas calls made."""
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def rate(self) -> float:
        """Sagas started or replayed per second."""
        return (self.started + self.replayed) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The summary for ``--json``."""
        return {
            "file": self.file,
            "import_id": self.import_id,
            "rows": self.rows,
            "started": self.started,
            "replayed": self.replayed,
            "failed": [
                {"line" if row.where.startswith("line") else "item": row.number, "error": error}
                for row, error in self.failed
            ],
            "not_started": self.not_started,
            "notes": self.notes,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "sagas_per_second": round(self.rate, 1),
            "interrupted": self.interrupted,
        }

    def text(self) -> str:
        """The summary for people."""
        verb = "interrupted" if self.interrupted else "imported"
        lines = [
            f"{verb} {self.file}: {self.rows} rows, {self.calls} StartSagas calls, "
            f"{self.seconds:.2f}s, {self.rate:.0f} sagas/s",
            f"  started      {self.started}",
            f"  replayed     {self.replayed}",
            f"  failed       {len(self.failed)}",
        ]
        if self.not_started:
            lines.append(f"  not started  {self.not_started} (in a chunk with a failed row)")
        lines += [f"  {row.where}: {error}" for row, error in self.failed]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"import id {self.import_id}")
        if self.failed:
            lines.append(
                f"(fix those rows and run again with --import-id {self.import_id}: "
                "what was started is replayed, the rest is started)"
            )
        return "\n".join(lines)


# -- reading ----------------------------------------------------------------------------


def file_format(path: str, given: str | None) -> str:
    """The format named by ``--format``, else by the file's extension."""
    if given:
        return given
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise CliError(
            f"cannot tell the format of {path}: name it with --format (jsonl, yaml, json or csv)",
            ExitCode.USAGE,
        )
    return _FORMATS[suffix]


def read_bytes(path: str) -> bytes:
    """The file's bytes (``-``: stdin)."""
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE) from exc


def import_id(data: bytes, template: bytes | None) -> str:
    """The digest of what is imported: the same file (and template) gives the same id,
    hence the same idempotency keys."""
    digest = hashlib.sha256(data)
    if template is not None:
        digest.update(b"\0template\0" + template)
    return digest.hexdigest()[:20]


def read_rows(
    data: bytes, fmt: str, *, path: str, template: Mapping[str, Any] | None, key_base: str
) -> list[Row]:
    """Every row of the file, each a request with its idempotency key, or its error."""
    try:
        text = data.decode("utf-8-sig")  # a byte order mark, as spreadsheets write, is no data
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text: {exc}", ExitCode.USAGE) from exc
    if fmt == "csv":
        if template is None:
            raise CliError("a CSV file needs --template (the saga each row fills)", ExitCode.USAGE)
        raw = _csv_rows(text, path, template)
    elif template is not None:
        raise CliError("--template is for CSV files only", ExitCode.USAGE)
    elif fmt == "jsonl":
        raw = _jsonl_rows(text)
    else:
        raw = _list_rows(text, fmt, path)
    return [_request(number, where, fill, key_base) for number, where, fill in raw]


Filled = Callable[[], Any]
"""A row's request as JSON, made on demand (raises RowError)."""


def _request(number: int, where: str, make: Filled, key_base: str) -> Row:
    try:
        data = make()
        if not isinstance(data, dict):
            raise RowError("is not an object (a StartSaga request)")
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise RowError(f"holds a value that is not JSON: {exc}") from exc
        try:
            request = parse_start_request(data)
        except InvalidArgument as exc:
            raise RowError(exc.message) from exc
    except RowError as exc:
        return Row(number=number, where=where, error=str(exc))
    if not request.idempotency_key:
        request.idempotency_key = f"import:{key_base}:{number}"
    return Row(number=number, where=where, request=request)


def _jsonl_rows(text: str) -> Iterator[tuple[int, str, Filled]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue

        def parse(line: str = line) -> Any:
            try:
                return json.loads(line)
            except json.JSONDecodeError as exc:
                raise RowError(f"is not JSON: {exc}") from exc

        yield number, f"line {number}", parse


def _list_rows(text: str, fmt: str, path: str) -> Iterator[tuple[int, str, Filled]]:
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CliError(f"{path} is not valid {fmt.upper()}: {exc}", ExitCode.USAGE) from exc
    if not isinstance(data, list):
        raise CliError(f"{path} must hold a list of StartSaga requests", ExitCode.USAGE)
    for number, item in enumerate(data, 1):
        yield number, f"item {number}", functools.partial(_same, item)


def _csv_rows(
    text: str, path: str, template: Mapping[str, Any]
) -> Iterator[tuple[int, str, Filled]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise CliError(f"{path} is empty: it needs a header line", ExitCode.USAGE) from None
    except csv.Error as exc:
        raise CliError(f"{path}, line 1: {exc}", ExitCode.USAGE) from exc
    columns = [name.strip() for name in header]
    if len(set(columns)) != len(columns) or not all(columns):
        raise CliError(f"{path}, line 1: column names must be unique and not empty", ExitCode.USAGE)
    missing = sorted(set(placeholders(template)) - set(columns))
    if missing:
        raise CliError(
            f"the template names columns {path} does not have: {', '.join(missing)} "
            f"(it has {', '.join(columns)})",
            ExitCode.USAGE,
        )
    end = reader.line_num
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The csv module cannot go on after a broken record (an unclosed quote).
            error = str(exc)
            yield start, f"line {start}", functools.partial(_raise, error)
            return
        end = reader.line_num
        if not record:
            continue  # a blank line
        if len(record) != len(columns):
            error = f"has {len(record)} fields, the header {len(columns)}"
            yield start, f"line {start}", functools.partial(_raise, error)
            continue
        values = dict(zip(columns, record, strict=True))
        yield start, f"line {start}", functools.partial(fill, template, values)


def _same(item: Any) -> Any:
    return item


def _raise(error: str) -> Any:
    raise RowError(error)


def placeholders(template: Any) -> Iterator[str]:
    """The column names the template's ``${row.…}`` placeholders use."""
    if isinstance(template, str):
        for match in _PLACEHOLDER.finditer(template):
            yield match.group(1).strip()
    elif isinstance(template, dict):
        for value in template.values():
            yield from placeholders(value)
    elif isinstance(template, list):
        for value in template:
            yield from placeholders(value)


def fill(template: Any, row: Mapping[str, str]) -> Any:
    """A copy of ``template`` with every ``${row.COLUMN[:type]}`` replaced from ``row``;
    other strings (``${steps.…}`` references included) stay as they are."""
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole:
            return _convert(row, whole.group(1).strip(), whole.group(2) or "str")
        if "${row." not in template:
            return template
        return _PLACEHOLDER.sub(lambda m: str(_convert(row, m.group(1).strip(), "str")), template)
    if isinstance(template, dict):
        return {key: fill(value, row) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, row) for value in template]
    return template


def _convert(row: Mapping[str, str], column: str, kind: str) -> Any:
    text = row[column]
    try:
        if kind == "number":
            number = float(text)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        if kind == "int":
            return int(text)
        if kind == "bool":
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError
            return word in _TRUE
        if kind == "json":
            return json.loads(text)
    except ValueError:
        raise RowError(f"column {column}: {text!r} is not {_KINDS[kind]}") from None
    return text


_KINDS = {"number": "a number", "int": "an integer", "bool": "true or false", "json": "JSON"}


# -- chunks -----------------------------------------------------------------------------


def chunks(rows: Sequence[Row], size: int) -> Iterator[list[Row]]:
    """The rows in file order, cut every ``size`` rows and before a chunk's request would
    pass :data:`SAFE_BATCH_BYTES`."""
    chunk: list[Row] = []
    total = 0
    for row in rows:
        # A saga's bytes in the batch: its own, its tag and its length (at most 4 bytes).
        cost = (row.request.ByteSize() if row.request is not None else 0) + 5
        if chunk and (len(chunk) == size or total + cost > SAFE_BATCH_BYTES):
            yield chunk
            chunk, total = [], 0
        chunk.append(row)
        total += cost
    if chunk:
        yield chunk


def span(chunk: Sequence[Row]) -> str:
    """``lines 1-500`` (or ``items 1-500``): the rows of a chunk."""
    kind = chunk[0].where.split()[0]
    first, last = chunk[0].number, chunk[-1].number
    return f"{kind}s {first}-{last}" if first != last else f"{kind} {first}"


class Progress(Protocol):
    """Where an import reports each chunk."""

    def chunk(self, rows: Sequence[Row], outcome: str) -> None: ...


async def send(
    client: SagaClient, rows: Sequence[Row], size: int, summary: Summary, progress: Progress
) -> None:
    """Send every chunk, in order, one at a time; fills ``summary``."""
    for chunk in chunks(rows, size):
        bad = [row for row in chunk if row.error is not None]
        if bad:
            summary.failed += [(row, row.error or "") for row in bad]
            summary.not_started += len(chunk) - len(bad)
            progress.chunk(chunk, f"not sent: {_rows(len(bad))} bad")
            continue
        await _send(client, chunk, summary, progress)


async def _send(
    client: SagaClient, chunk: Sequence[Row], summary: Summary, progress: Progress
) -> None:
    summary.calls += 1
    try:
        started = await client.start_sagas([row.request for row in chunk if row.request])
    except (InvalidArgument, IdempotencyConflict) as exc:
        indexed = [v for v in exc.violations if v.index is not None and v.index < len(chunk)]
        if not indexed and len(chunk) > 1 and isinstance(exc, InvalidArgument):
            # About the batch as a whole (its size, or its answer's): halve it.
            half = len(chunk) // 2
            await _send(client, chunk[:half], summary, progress)
            await _send(client, chunk[half:], summary, progress)
            return
        _refused(chunk, exc, indexed, summary)
        progress.chunk(chunk, f"refused: {_rows(len(indexed) or len(chunk))} bad")
        return
    summary.replayed += len(started.replayed)
    summary.started += len(started) - len(started.replayed)
    fresh = len(started) - len(started.replayed)
    progress.chunk(chunk, f"{fresh} started, {len(started.replayed)} replayed")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _refused(
    chunk: Sequence[Row],
    exc: InvalidArgument | IdempotencyConflict,
    indexed: list[FieldViolation],
    summary: Summary,
) -> None:
    if isinstance(exc, IdempotencyConflict):
        summary.conflicts += len(indexed) or 1
    if not indexed:  # refused as a whole (a lone saga over a limit, say)
        summary.failed.append((chunk[0], exc.message))
        summary.not_started += len(chunk) - 1
        return
    named: dict[int, str] = {}
    for v in indexed:
        assert v.index is not None
        rest = v.field.removeprefix(f"sagas[{v.index}]").lstrip(".")
        named.setdefault(v.index, f"{rest}: {v.description}" if rest else v.description)
    summary.failed += [(chunk[i], error) for i, error in sorted(named.items())]
    summary.not_started += len(chunk) - len(named)
    unlisted = [v for v in exc.violations if v.index is None]
    if unlisted:
        summary.notes.append(f"{span(chunk)}: {unlisted[0].description}")


# -- the command ------------------------------------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    """``sagaplane import FILE``."""
    if not 1 <= args.chunk <= MAX_BATCH:
        raise CliError(f"--chunk must be between 1 and {MAX_BATCH}", ExitCode.USAGE)
    fmt = "csv" if args.csv else file_format(args.file, args.format)
    template: dict[str, Any] | None = None
    template_bytes: bytes | None = None
    if args.template is not None:
        from coordinator.cli.client import load_saga_file

        template = load_saga_file(args.template)
        template_bytes = read_bytes(args.template)
    data = read_bytes(args.file)
    key_base = args.import_id or import_id(data, template_bytes)
    if len(key_base) > 100 or not key_base.isprintable():
        raise CliError("--import-id must be printable and at most 100 characters", ExitCode.USAGE)
    rows = read_rows(data, fmt, path=args.file, template=template, key_base=key_base)
    summary = Summary(file=args.file, import_id=key_base, rows=len(rows))
    return asyncio.run(_import(args, rows, summary))


async def _import(args: argparse.Namespace, rows: list[Row], summary: Summary) -> int:
    from coordinator.cli.client import connect

    began = time.monotonic()
    code: int = ExitCode.OK
    with _progress(len(rows), args.quiet) as progress:
        try:
            async with connect(args) as client:
                await send(client, rows, args.chunk, summary, progress)
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us
            summary.interrupted = True
            summary.notes.append(
                "interrupted: a chunk in flight may or may not have started; "
                "run the same import again to finish it (nothing starts twice)"
            )
            code = 130
        except CliError as exc:
            if not isinstance(exc.__cause__, CoordinatorError):
                raise
            summary.notes.append(f"stopped: {exc.message}")
            code = exc.code
    summary.seconds = time.monotonic() - began
    say(render.dumps(summary.to_json()) if args.json else summary.text())
    if code == ExitCode.OK and summary.failed:
        code = ExitCode.USAGE if len(summary.failed) > summary.conflicts else ExitCode.REFUSED
    return code


class _PlainProgress:
    """One line per chunk on stderr, for logs and pipes."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet

    def chunk(self, rows: Sequence[Row], outcome: str) -> None:
        self.done += len(rows)
        if not self.quiet:
            print(f"{span(rows)}: {outcome} ({self.done}/{self.total})", file=sys.stderr)

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _BarProgress:
    """A progress bar on the terminal (rich), advanced per chunk."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task("import", total=total)

    def chunk(self, rows: Sequence[Row], outcome: str) -> None:
        self._bar.advance(self._task, len(rows))

    def __enter__(self) -> _BarProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()


def _progress(total: int, quiet: bool) -> _PlainProgress | _BarProgress:
    if sys.stderr.isatty() and not quiet:
        return _BarProgress(total)
    return _PlainProgress(total, quiet)


def add_import(parser: argparse.ArgumentParser) -> None:
    """The flags of ``sagaplane import``."""
    parser.add_argument("file", metavar="FILE", help="the rows: .jsonl, .yaml, .json or .csv")
    parser.add_argument(
        "--template",
        metavar="FILE",
        help="the saga each CSV row fills (YAML or JSON, like a `sagaplane start` file)",
    )
    parser.add_argument(
        "--format", choices=["jsonl", "yaml", "json", "csv"], help="FILE's format, if not by name"
    )
    parser.add_argument("--csv", action="store_true", help="FILE is CSV (--format csv)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=500,
        help=f"sagas per StartSagas call, 1 to {MAX_BATCH} (default %(default)s): each "
        "chunk is started whole or not at all",
    )
    parser.add_argument(
        "--import-id",
        metavar="ID",
        help="the base of the rows' idempotency keys (default: a digest of FILE and the "
        "template); pass the one printed earlier to resume after fixing rows",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress, only the summary at the end"
    )
