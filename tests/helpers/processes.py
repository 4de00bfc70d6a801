"""A coordinator as a real child process, for tests that kill or restart it."""

from __future__ import annotations

import os
import sys

from sagaplane.client import SagaClient
from sagaplane.testing import Child, free_port

__all__ = ["CoordinatorProcess", "free_port"]


class CoordinatorProcess(Child):
    """``python -m coordinator`` as a child process on a port of its own."""

    def __init__(self, database_url: str, amqp_url: str, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(
            "coordinator",
            [sys.executable, "-m", "coordinator"],
            env={
                **os.environ,
                "SAGAPLANE_DATABASE_URL": database_url,
                "SAGAPLANE_AMQP_URL": amqp_url,
                "SAGAPLANE_LISTEN": self.address,
                "SAGAPLANE_GRACE": "1",
            },
        )

    @property
    def address(self) -> str:
        """``host:port`` of its gRPC API."""
        return f"127.0.0.1:{self.port}"

    async def start(self, extra_env: dict[str, str] | None = None) -> None:
        """Start it and wait until it is SERVING."""
        await super().start(extra_env)
        await self.wait_healthy()

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until its health service says SERVING; fails if it exits first."""

        def alive() -> None:
            assert self.alive, f"coordinator died:\n{self.tail()}"

        async with SagaClient(self.address) as client:
            await client.wait_until_serving(timeout, alive=alive)

    async def terminate(self) -> int | None:
        """SIGTERM, and the exit status of the graceful shutdown (SIGKILL after 60 s)."""
        return await self.stop(grace=60.0)
