"""Fixtures that drive the Node.js and Go clients, and the Node.js participant, as real
child processes against a real coordinator.

The toolchains come from ``scripts/polyglot-setup`` (Debian's Go and protoc, ``npm ci``).
Where one is missing these tests skip and say so, except under CI (``CI`` set), where a
missing toolchain is a failure: CI installs them, so their absence is a broken build.
Each client is compiled once per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"
GO_CLIENT = ROOT / "clients" / "go"
NODE_PARTICIPANT = ROOT / "examples" / "node-participant"
GO_IMPORT_PATH = "github.com/sagaplane/sagaplane/clients/go"
DEBIAN_GOPATH = Path("/usr/share/gocode")
BUILD_TIMEOUT = 240.0
RUN_TIMEOUT = 90.0


def toolchain_missing(what: str) -> None:
    """Skip (on a developer's machine) or fail (under CI) because ``what`` is missing."""
    message = f"{what}; run scripts/polyglot-setup"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run the polyglot tests)", pytrace=False)
    pytest.skip(message)


async def run(
    *args: str | Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
    check: bool = True,
) -> tuple[int, str, str]:
    """Run a command to its end; fails the test with its output when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, args),
        cwd=cwd,
        env=os.environ | (env or {}),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{' '.join(map(str, args))} did not finish within {timeout}s")
    code = proc.returncode
    assert code is not None
    if check and code != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {code}\n"
            f"--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}",
            pytrace=False,
        )
    return code, out.decode(), err.decode()


def json_lines(stdout: str) -> dict[str, dict[str, Any]]:
    """The quickstarts' output, one JSON object per line, keyed by its "op"."""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {line["op"]: line for line in lines}


# -- the clients, built once per session --------------------------------------------------


@pytest.fixture(scope="session")
async def node_quickstart() -> Path:
    """clients/node compiled (tsc); the path of its compiled quickstart example."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        toolchain_missing("node and npm are not installed")
    if not (NODE_CLIENT / "node_modules" / ".bin" / "tsc").exists():
        toolchain_missing("clients/node has no node_modules")
    await run("npm", "run", "--silent", "build", cwd=NODE_CLIENT, timeout=BUILD_TIMEOUT)
    return NODE_CLIENT / "dist" / "examples" / "quickstart.js"


@pytest.fixture(scope="session")
async def go_quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/go's quickstart example, built in GOPATH mode against Debian's Go libraries."""
    if shutil.which("go") is None:
        toolchain_missing("go is not installed")
    if not (DEBIAN_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        toolchain_missing("Debian's golang-google-grpc-dev is not installed")
    # GOPATH mode finds packages by import path: put the client where its path says.
    gopath = tmp_path_factory.mktemp("gopath")
    package_dir = gopath / "src" / GO_IMPORT_PATH
    package_dir.parent.mkdir(parents=True)
    package_dir.symlink_to(GO_CLIENT, target_is_directory=True)
    env = {"GO111MODULE": "off", "GOPATH": f"{gopath}:{DEBIAN_GOPATH}", "GOFLAGS": ""}
    if not os.environ.get("HOME") and not os.environ.get("GOCACHE"):
        env["GOCACHE"] = str(gopath / "cache")
    binary = gopath / "bin" / "quickstart"
    # vet type-checks the generated package too (the example uses only part of it).
    await run("go", "vet", "./...", cwd=package_dir, env=env, timeout=BUILD_TIMEOUT)
    build = ("go", "build", "-o", str(binary), "./examples/quickstart")
    await run(*build, cwd=package_dir, env=env, timeout=BUILD_TIMEOUT)
    return binary


# -- the Node.js participant ----------------------------------------------------------------


@dataclass
class NodeParticipant:
    """``node examples/node-participant/participant.js`` as a child process."""

    amqp_url: str
    proc: asyncio.subprocess.Process | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "node",
            "participant.js",
            cwd=NODE_PARTICIPANT,
            env=os.environ | {"SAGAPLANE_AMQP_URL": self.amqp_url},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read_events(), name="node-participant-stdout"),
            asyncio.create_task(self._read_stderr(), name="node-participant-stderr"),
        ]
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await asyncio.sleep(0.1)  # let the readers collect the last words
                pytest.fail(
                    f"the Node.js participant did not start (exit {self.proc.returncode}):\n"
                    + "".join(self.stderr),
                    pytrace=False,
                )
            await asyncio.sleep(0.05)

    async def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            event = json.loads(raw)
            self.events.append(event)
            if event.get("event") == "ready":
                self._ready.set()

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr.append(raw.decode())

    def handled(self, action: str | None = None) -> list[dict[str, Any]]:
        """The commands it answered (optionally only those of ``action``), in order."""
        return [
            e
            for e in self.events
            if e.get("event") == "handled" and (action is None or e["action"] == action)
        ]

    async def stop(self) -> int:
        """SIGTERM (the participant finishes what is in hand), and its exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)
        return code


@pytest.fixture
async def node_participant(amqp_url: str, node_quickstart: Path) -> AsyncIterator[NodeParticipant]:
    """The Node.js shipping participant, consuming from the test's vhost.

    It imports the compiled client, so it depends on ``node_quickstart`` (the build).
    """
    if not (NODE_PARTICIPANT / "node_modules" / "amqplib").is_dir():
        toolchain_missing("examples/node-participant has no node_modules")
    participant = NodeParticipant(amqp_url)
    await participant.start()
    try:
        yield participant
    finally:
        code = await participant.stop()
        assert code == 0, f"the Node.js participant exited {code}:\n{''.join(participant.stderr)}"


def by_name(steps: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A saga's steps (protobuf JSON) keyed by step name."""
    return {step["name"]: step for step in steps}
