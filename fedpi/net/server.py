"""One lifecycle for both services' gRPC servers: health and reflection beside the service, SERVING once started,
and on SIGTERM or SIGINT a graceful stop that says NOT_SERVING before calls are refused."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def add_health_and_reflection(server: grpc.aio.Server, services: Sequence[str]) -> health.aio.HealthServicer:
    """grpc.health.v1 and server reflection for `services` (full names) on `server`; the health servicer, to be
    switched to SERVING by `start`."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health_servicer


async def start(servers: Sequence[grpc.aio.Server], health_servicer: health.aio.HealthServicer,
                services: Sequence[str]) -> None:  # fmt: skip
    for server in servers:
        await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def until_signalled() -> None:
    """Return on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def stop(
    servers: Sequence[grpc.aio.Server],
    health_servicer: health.aio.HealthServicer,
    grace: float,
    before: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """NOT_SERVING first, so probes and clients see the shutdown before calls are refused; then `before` (the
    service's own wind-down), then the servers, each call given `grace` seconds to finish."""
    await health_servicer.enter_graceful_shutdown()
    if before is not None:
        await before()
    await asyncio.gather(*(server.stop(grace) for server in servers))
