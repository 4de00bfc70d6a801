"""Child processes under supervision: started, watched, stopped or killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["Child", "ChildExited", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ChildExited(RuntimeError):
    """A child process ended while it was needed; the message holds its last log lines."""


class Child:
    """A child process whose output (stdout and stderr) is kept.

    With ``log_path``, the output is appended to that file (kept across restarts, each
    start marked); without, the last ``tail_lines`` lines are kept in memory and, with
    ``echo``, each line is passed to it as it arrives. ``env`` is the whole environment
    (None: this process's). ``new_session`` puts the child in a session of its own, so
    that a Ctrl-C in the terminal reaches only the parent, which then stops it in order.
    :meth:`start` may be called again after the child ended (a restart).
    :meth:`output_mark` and :meth:`output_since` read what it wrote over a span of time.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        log_path: Path | None = None,
        echo: Callable[[str], None] | None = None,
        tail_lines: int = 40,
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        self.starts = 0
        """How many times it was started."""
        self.kills = 0
        """How many times :meth:`kill` (or a stop past its grace) sent SIGKILL."""
        self.proc: asyncio.subprocess.Process | None = None
        self._echo = echo
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._lines = 0  # lines read into the tail so far, all starts together
        self._new_session = new_session
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The running (or last) process's pid."""
        assert self.proc is not None, f"{self.name}: start() first"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        """The exit status, once it exited."""
        return None if self.proc is None else self.proc.returncode

    async def start(self, extra_env: Mapping[str, str] | None = None) -> None:
        """Start it (again); ``extra_env`` is added to its environment for this start."""
        assert not self.alive, f"{self.name} is running already"
        env = {**(self.env if self.env is not None else os.environ), **(extra_env or {})}
        log: IO[bytes] | None = None
        if self.log_path is not None:
            log = self.log_path.open("ab")
            log.write(f"==== start {self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log if log is not None else asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=self._new_session,
            )
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        self.starts += 1
        if log is None:
            self._drain = asyncio.create_task(self._read(self.proc), name=f"drain-{self.name}")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        # Read continuously: a child blocked on a full pipe would stop working.
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            self._lines += 1
            if self._echo is not None:
                self._echo(line)

    def tail(self, lines: int = 40) -> str:
        """Its last output lines."""
        if self.log_path is None:
            return "\n".join(list(self._tail)[-lines:])
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def output_mark(self) -> int:
        """Where its output ends now, to pass to :meth:`output_since` later (a byte
        offset into ``log_path``, or a count of lines read)."""
        if self.log_path is None:
            return self._lines
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def output_since(self, mark: int) -> list[str]:
        """The lines it wrote after :meth:`output_mark` returned ``mark``; without a
        log file, only those still among the last ``tail_lines``."""
        if self.log_path is None:
            new = self._lines - mark
            return list(self._tail)[-new:] if new > 0 else []
        try:
            with self.log_path.open("rb") as log:
                log.seek(mark)
                return log.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def check_alive(self) -> None:
        """Raise :class:`ChildExited`, with its last lines, if it has exited."""
        if self.proc is not None and self.proc.returncode is not None:
            where = f" (see {self.log_path})" if self.log_path is not None else ""
            raise ChildExited(
                f"{self.name} (pid {self.proc.pid}) exited with status "
                f"{self.proc.returncode}{where}; its last lines:\n{self.tail()}"
            )

    async def kill(self) -> int | None:
        """SIGKILL: no shutdown code runs. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        status = await self.proc.wait()
        await self._drained()
        return status

    async def stop(
        self, grace: float = 20.0, *, sig: signal.Signals = signal.SIGTERM
    ) -> int | None:
        """SIGTERM (or ``sig``, e.g. SIGINT for a tool that writes its results on it),
        then SIGKILL if it has not exited after ``grace`` seconds; returns the exit status
        (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                async with asyncio.timeout(grace):
                    await self.proc.wait()
            except TimeoutError:
                return await self.kill()
        status = await self.proc.wait()
        await self._drained()
        return status

    async def _drained(self) -> None:
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await self._drain
            self._drain = None
