"""Building the grpc.aio server: the API, health, reflection and interceptors.

The port is bound before anything else of the coordinator starts (:meth:`ApiServer.bind`),
and bound alone: gRPC sets ``SO_REUSEPORT`` by default, so a second coordinator started
on a port already in use would bind it too, silently, and the kernel would split the
calls between the two (and their databases). With ``grpc.so_reuseport`` off, the second
one is refused, and :class:`ListenError` says why.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.api.interceptors import ErrorMappingInterceptor
from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.api.validation import MAX_BATCH_BYTES
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["SagaCoordinatorService"].full_name


class ListenError(OSError):
    """The gRPC address cannot be listened on (for one: another process has it)."""

    def __init__(self, listen: str, why: str) -> None:
        super().__init__(f"cannot listen on {listen}: {why}")
        self.listen = listen
        self.why = why


class ApiServer:
    """The coordinator's gRPC server and its health status.

    :meth:`bind` takes the port; :meth:`start` adds the API and accepts calls.
    """

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port
        """The port bound (useful with port 0)."""
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    @classmethod
    async def bind(
        cls,
        listen: str,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> ApiServer:
        """A server bound to ``listen`` (``host:port``), not serving yet; ``interceptors``
        go around the API's own (the metrics' counter sees the final status). With
        ``credentials`` (coordinator.api.tls), the port serves TLS only.

        Raises :class:`ListenError`, e.g. ``address in use``, when the address is taken.
        """
        server = grpc.aio.server(
            interceptors=[*interceptors, ErrorMappingInterceptor()],
            options=[
                # Past the validated limits (MAX_REQUEST_BYTES, and twice it for a
                # StartSagas batch), so oversize requests get a clear INVALID_ARGUMENT;
                # far past them, gRPC itself refuses them with RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", 2 * MAX_BATCH_BYTES),
                # One coordinator per address: see the module docstring.
                ("grpc.so_reuseport", 0),
            ],
        )
        # Asked first, so that a taken port is one clean error rather than gRPC's own
        # log line; gRPC's bind below stays the authority (the port may go in between).
        taken = await _taken(listen)
        if taken is not None:
            raise ListenError(listen, taken)
        try:
            if credentials is None:
                port = server.add_insecure_port(listen)
            else:
                port = server.add_secure_port(listen, credentials)
        except RuntimeError:  # gRPC's "Failed to bind to address"
            port = 0
        if port == 0:
            raise ListenError(listen, await _taken(listen) or "gRPC could not bind it")
        return cls(server, port)

    async def start(self, servicer: SagaCoordinatorServicer) -> None:
        """Add the API, accept calls and report SERVING."""
        coordinator_pb2_grpc.add_SagaCoordinatorServiceServicer_to_server(servicer, self.server)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING first (load balancers drain), then let calls finish."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def _taken(listen: str) -> str | None:
    """Why ``listen`` cannot be bound (``address in use``, ...), or None if it can (or
    if it is not a ``host:port`` this check understands; gRPC then decides alone)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) == 0:
        return None
    name = host.removeprefix("[").removesuffix("]") or None
    try:
        found = await asyncio.get_running_loop().getaddrinfo(
            name, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {name!r} ({exc})"
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR (a port in TIME_WAIT is free), no SO_REUSEPORT.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        "address in use (is another coordinator running there? Two "
                        "coordinators on one address would split the calls between them)"
                    )
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue  # e.g. ::1 on a host without IPv6; gRPC skips it too
                return os.strerror(exc.errno) if exc.errno else str(exc)
    return None
