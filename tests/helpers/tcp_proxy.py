"""A TCP proxy that a test cuts, holds and restores: a broker outage seen by one client
only.

The real RabbitMQ and PostgreSQL serve other work on the development machines and must
never be stopped. A client connected through :class:`TcpProxy` sees its server go away
(:meth:`TcpProxy.cut`: every connection dropped, new ones refused) and come back
(:meth:`TcpProxy.restore`: accepted again, on the same port), or stop answering
(:meth:`TcpProxy.hold`: connections stay open and nothing passes either way, as in a
network partition that drops packets, until :meth:`TcpProxy.release`), while everyone
else's connections to the server are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` until cut.

    Use ``async with TcpProxy(host, port) as proxy:``; :attr:`port` is chosen free at
    :meth:`start` and kept across :meth:`cut` and :meth:`restore`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        """The port clients connect to."""
        return self._port

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def start(self) -> None:
        """Listen (on a free port the first time, on the same one after a cut)."""
        if self._server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)

    async def restore(self) -> None:
        """Accept connections again, as a server back from an outage."""
        await self.start()

    def hold(self) -> None:
        """Stop passing bytes, either way, on every connection (open ones stay open): a
        server that no longer answers, and a client it no longer hears."""
        self._flowing.clear()

    def release(self) -> None:
        """Pass bytes again, starting with what was held."""
        self._flowing.set()

    async def cut(self) -> None:
        """Refuse new connections and drop every open one, as a server that went away."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            # An abort, not a close: the client sees its connection reset, not a goodbye.
            writer.transport.abort()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        pipes = [
            asyncio.create_task(self._pipe(client_r, server_w)),
            asyncio.create_task(self._pipe(server_r, client_w)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            self._writers.difference_update((client_w, server_w))
            for writer in (client_w, server_w):
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One direction ended: the connection is over for both.
            writer.transport.abort()
