"""Real processes for crash tests: start, wait until healthy, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class CoordinatorProcess:
    """``python -m coordinator`` as a child process."""

    database_url: str
    amqp_url: str
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = os.environ | {
            "SAGAPLANE_DATABASE_URL": self.database_url,
            "SAGAPLANE_AMQP_URL": self.amqp_url,
            "SAGAPLANE_LISTEN": self.address,
            "SAGAPLANE_GRACE": "1",
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "coordinator", env=env, stdout=asyncio.subprocess.DEVNULL
        )
        await self.wait_healthy()

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout), grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc is not None and self.proc.returncode is None, "coordinator died"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self) -> int:
        """SIGTERM, and the exit status of the graceful shutdown."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.proc.wait()
