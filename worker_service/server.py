"""Serve the worker: the fedpi.v1.Worker service, grpc.health.v1 and server reflection; graceful stop on SIGTERM."""

from __future__ import annotations

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedpi.net import server as grpc_server
from fedpi.net.auth import AuthInterceptor, ServerSecurity
from fedpi.net.ports import listen
from fedpi.net.protocol import SERVICE_NAME
from fedpi.weights import wire
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from worker_service.metrics import MetricsInterceptor
from worker_service.servicer import WorkerServicer

log = structlog.get_logger()

# Coordinators ping quiet connections (as often as every second, --keepalive) so that a long Train on a slow Pi
# survives NATs and idle timeouts. Accept that; a client that pings more than twice as often gets a few strikes, then
# GOAWAY, so pings cannot be used to keep a Pi busy.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second worker on a taken port fails to start instead of sharing its calls
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 3),
]
# A worker serves one coordinator; beyond this many calls at once, further calls get RESOURCE_EXHAUSTED.
MAX_CONCURRENT_RPCS = 32


def _listen(server: grpc.aio.Server, address: str, security: ServerSecurity) -> int:
    return listen(server, address, security.credentials() if security.tls else None)


class _Registration:
    """Stands in for a server to catch the method handlers generated code registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _add_worker_service(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
    """The generated handlers, but weight streams are read and written by fedpi.weights.wire:
    data chunks arrive as views of what gRPC received and leave with one copy fewer."""
    caught = _Registration()
    pb_grpc.add_WorkerServicer_to_server(servicer, caught)
    handlers = dict(caught.handlers)
    handlers["SetWeights"] = grpc.stream_unary_rpc_method_handler(
        servicer.SetWeights,
        request_deserializer=wire.from_wire,
        response_serializer=handlers["SetWeights"].response_serializer,
    )
    handlers["GetWeights"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetWeights,
        request_deserializer=handlers["GetWeights"].request_deserializer,
        response_serializer=wire.to_wire,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(caught.service, handlers),))
    server.add_registered_method_handlers(caught.service, handlers)


async def create_server(
    servicer: WorkerServicer,
    address: str,
    security: ServerSecurity = ServerSecurity(),
    health_address: str | None = None,
) -> tuple[list[grpc.aio.Server], int, health.aio.HealthServicer]:
    """The worker's server (plus, if asked, a plaintext server with only the health service, for kubelet probes,
    which cannot speak TLS). Returns the servers, the main port and the health servicer."""
    # Metrics outermost, so that calls refused by authentication are counted too.
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        interceptors=[MetricsInterceptor(servicer.metrics), AuthInterceptor(security)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    _add_worker_service(servicer, server)
    health_servicer = grpc_server.add_health_and_reflection(server, (SERVICE_NAME,))
    servers = [server]
    port = _listen(server, address, security)
    if health_address:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        # Reflection too, so `grpcurl -plaintext HOST:HEALTH_PORT grpc.health.v1.Health/Check` works as is.
        reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), health_server)
        _listen(health_server, health_address, ServerSecurity())
        servers.append(health_server)
    return servers, port, health_servicer


async def serve(
    servicer: WorkerServicer,
    address: str,
    grace: float = 10.0,
    security: ServerSecurity = ServerSecurity(),
    health_address: str | None = None,
) -> None:
    servers, port, health_servicer = await create_server(servicer, address, security, health_address)
    await grpc_server.start(servers, health_servicer, (SERVICE_NAME,))
    log.info(
        "worker_started",
        address=address,
        port=port,
        model=servicer.model_name,
        dataset=servicer.data.name,
        train_samples=len(servicer.data.train),
        partition=servicer.partition,
        tls=security.tls,
        mutual_tls=security.client_ca_file is not None,
        token=security.token is not None,
        health_address=health_address,
    )

    try:
        await grpc_server.until_signalled()
    finally:
        log.info("worker_stopping", grace_seconds=grace)
        await grpc_server.stop(servers, health_servicer, grace)
        log.info("worker_stopped")
