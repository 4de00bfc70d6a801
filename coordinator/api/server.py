"""Building the grpc.aio server: the API, health, reflection and interceptors."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.api.interceptors import ErrorMappingInterceptor
from coordinator.api.servicer import SagaCoordinatorServicer
from coordinator.api.validation import MAX_BATCH_BYTES
from sagaplane.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["SagaCoordinatorService"].full_name


class ApiServer:
    """The coordinator's gRPC server and its health status."""

    def __init__(self, servicer: SagaCoordinatorServicer, listen: str) -> None:
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=[
                # Past the validated limits (MAX_REQUEST_BYTES, and twice it for a
                # StartSagas batch), so oversize requests get a clear INVALID_ARGUMENT;
                # far past them, gRPC itself refuses them with RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", 2 * MAX_BATCH_BYTES),
            ],
        )
        coordinator_pb2_grpc.add_SagaCoordinatorServiceServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")

    async def start(self) -> None:
        """Accept calls and report SERVING."""
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING first (load balancers drain), then let calls finish."""
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
