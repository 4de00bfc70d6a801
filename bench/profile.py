"""py-spy profiles of the processes under test, and a text summary of them.

The harness (``--profile``) attaches ``py-spy record --format raw`` to the coordinator and
to one participant for the measured throughput run. Raw output is "collapsed stacks" (one
line per distinct stack: ``frame;frame;...;frame count``); speedscope opens it as is.
Only samples where a thread was running are recorded (no ``--idle``), so the summary says
where CPU time goes, not where the process waits.

``python -m bench.profile FILE.txt [--top N]`` prints the summary of a recording:

- **by activity**: each sample charged to what the process is doing (handling replies,
  relaying the outbox, serving StartSaga, ...), by the frames in its stack;
- **by library (self)**: each sample charged to the library of its innermost frame;
- the functions with the most self time and the most inclusive time.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sagaplane.testing import Child

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# The first activity (in this order) with a frame anywhere in the stack wins: what the
# process is doing. Each pattern is matched against one frame ("function (file:line)").
ACTIVITIES: list[tuple[str, str]] = [
    ("threads (grpc poller, executor)", r"\(threading\.py"),
    ("grpc: StartSaga", r"^SagaCoordinatorServicer\.StartSaga "),
    ("grpc: GetSaga", r"^SagaCoordinatorServicer\.GetSaga "),
    ("grpc: ListActive", r"^SagaCoordinatorServicer\.ListActive "),
    ("grpc: other (interceptor, request parsing)", r"interceptors\.py|_tolerant"),
    ("replies: apply batch (ReplyConsumer._handle)", r"^ReplyConsumer\._handle "),
    ("replies: batching loop", r"^ReplyConsumer\._run "),
    ("participant: handle command (CommandConsumer._handle)", r"^CommandConsumer\._handle "),
    ("relay: publish (aio-pika, confirms)", r"^OutboxRelay\._publish"),
    ("relay: claim / mark sent (SQL)", r"^OutboxRelay\.(run|_cycle|relay_once) "),
    ("relay: LISTEN/NOTIFY", r"^OutboxRelay\._listen "),
    ("timers", r"^TimerLoop\."),
    ("amqp: frame I/O (aiormq reader/writer)", r"^Connection\.__(reader|writer) "),
    ("amqp: delivery dispatch (aiormq/aio-pika)", r"^Channel\._reader |^consumer \(.*aio_pika"),
    ("psycopg-pool maintenance", r"psycopg_pool"),
]
EVENT_LOOP = "event loop (select, callback dispatch, native callbacks e.g. grpc cython)"

# Innermost match wins: whose code the CPU was running. py-spy names files by module path
# ("asyncio/events.py", "coordinator/store/repository.py").
LIBRARIES: list[tuple[str, str]] = [
    ("coordinator.engine", r"\(coordinator/engine/"),
    ("coordinator.store", r"\(coordinator/store/"),
    ("coordinator.api", r"\(coordinator/api/"),
    ("coordinator.messaging", r"\(coordinator/messaging/"),
    ("coordinator (other)", r"\(coordinator/"),
    ("sagaplane.relay", r"\(sagaplane/relay\.py"),
    # The participant's modules (the lifecycle, the consumer loop, the transaction, the wire).
    (
        "sagaplane.participant",
        r"\(sagaplane/(participant|command_consumer|inbox|wire|handler|middleware)\.py",
    ),
    ("sagaplane.structs", r"\(sagaplane/structs\.py"),
    ("sagaplane (other)", r"\(sagaplane/"),
    ("bench", r"\(bench/"),
    ("protobuf (python)", r"protobuf/"),
    ("psycopg_pool", r"\(psycopg_pool/"),
    ("psycopg", r"\(psycopg/"),
    ("aio-pika/aiormq/pamqp", r"\((aio_pika|aiormq|pamqp)/"),
    ("grpc (python)", r"\(grpc"),
    ("logging", r"\(logging/"),
    ("threads (no python frames: grpc poller, executor)", r"\((threading\.py|concurrent/)"),
    ("asyncio event loop (+ native callbacks)", r"\((asyncio/|selectors\.py)"),
    ("ulid", r"\(ulid/"),
    ("json", r"\(json/"),
    ("dataclasses/enum/typing", r"\((dataclasses|enum|typing)\.py|\(<string>"),
]


@dataclass
class Summary:
    """A recording, tallied."""

    samples: int = 0
    """Samples of the main thread (the event loop), which the tallies below count."""
    other_threads: Counter[str] = field(default_factory=Counter)
    """Samples of other threads, by their innermost frame. py-spy cannot tell that a thread
    blocked in native code (grpc's poller, an idle executor worker) is idle, so these are
    NOT CPU time: per-thread CPU from /proc (the harness's resources) is."""
    activity: Counter[str] = field(default_factory=Counter)
    library: Counter[str] = field(default_factory=Counter)
    self_fn: Counter[str] = field(default_factory=Counter)
    inclusive_fn: Counter[str] = field(default_factory=Counter)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``; the module path is trimmed."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/work/main/", "clients/python/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def summarize(path: Path) -> Summary:
    """Tally a py-spy raw (collapsed stacks) file."""
    s = Summary()
    activities = [(name, re.compile(p)) for name, p in ACTIVITIES]
    libraries = [(name, re.compile(p)) for name, p in LIBRARIES]
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if any(f.startswith("Thread._bootstrap ") for f in frames):
            s.other_threads[_short(frames[-1])] += count
            continue
        s.samples += count
        activity = next(
            (name for name, rx in activities if any(rx.search(f) for f in frames)),
            EVENT_LOOP
            if frames and re.search(r"\((asyncio/|selectors\.py)", frames[-1])
            else "other",
        )
        s.activity[activity] += count
        library = next(
            (name for f in reversed(frames) for name, rx in libraries if rx.search(f)),
            "native/other",
        )
        s.library[library] += count
        if frames:
            s.self_fn[_short(frames[-1])] += count
        for fn in {_short(f) for f in frames}:
            s.inclusive_fn[fn] += count
    return s


def render(s: Summary, *, rate: int = 100, top: int = 20, title: str = "") -> str:
    """The summary as text: shares of CPU samples, top entries first."""
    if not s.samples:
        return f"{title}: no samples\n"
    lines = [
        f"{title}: main thread {s.samples} samples (~{s.samples / rate:.1f} s busy at {rate} Hz)"
    ]

    def block(name: str, counter: Counter[str], n: int) -> None:
        lines.append(f"  {name}")
        for key, count in counter.most_common(n):
            lines.append(f"    {100 * count / s.samples:5.1f}%  {key}")

    block("by activity (first match in ACTIVITIES order)", s.activity, 16)
    block("by library (innermost frame, i.e. self time)", s.library, 16)
    block("functions by self time", s.self_fn, top)
    block("functions by inclusive time", s.inclusive_fn, top)
    if s.other_threads:
        lines.append(
            f"  other threads: {sum(s.other_threads.values())} samples, not CPU time (py-spy "
            "cannot see native idle waits); innermost frames: "
            + ", ".join(f"{k} x{v}" for k, v in s.other_threads.most_common(3))
        )
    return "\n".join(lines) + "\n"


def py_spy_binary() -> str:
    """py-spy, from the venv of this interpreter or the PATH."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy not found: pip install py-spy (bench extra)")
    return found


class Recorder:
    """``py-spy record`` attached to a running process until :meth:`stop`."""

    def __init__(
        self, pid: int, output: Path, *, rate: int = 100, native: bool = False, gil: bool = False
    ):
        self.pid = pid
        self.gil = gil
        self.output = output
        self.rate = rate
        self.native = native
        self._child: Child | None = None
        self._log = output.with_suffix(".py-spy.log")

    async def start(self) -> None:
        argv = [
            py_spy_binary(),
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--output",
            str(self.output),
        ]
        if self.native:
            argv.append("--native")
        if self.gil:
            argv.append("--gil")
        self._child = Child(f"py-spy {self.pid}", argv, log_path=self._log)
        await self._child.start()
        await asyncio.sleep(0.5)  # attached (py-spy reads the interpreter's memory first)

    async def stop(self) -> None:
        """Stop sampling; py-spy writes its output on SIGINT."""
        if self._child is not None:
            await self._child.stop(grace=30, sig=signal.SIGINT)


def main() -> None:
    """Entry point: summarise recordings."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("files", nargs="+", type=Path, help="py-spy raw (collapsed) files")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--rate", type=int, default=100, help="the sampling rate used")
    args = parser.parse_args()
    for path in args.files:
        print(render(summarize(path), rate=args.rate, top=args.top, title=str(path)))


if __name__ == "__main__":
    main()
