"""The worker's Prometheus metrics (prometheus-client), served on --metrics-port at /metrics.

Every call is counted by method and final status code by an interceptor that sits outside authentication, so
refused callers show up too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedpi.net.handlers import wrap_handler
from generated.fedpi.v1 import worker_pb2 as pb


class WorkerMetrics:
    def __init__(self, worker_id: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "fedpi_worker_rpcs", "Calls served, by method and final gRPC status code", ["method", "code"], registry=r
        )
        self.uploads_refused = Counter(
            "fedpi_worker_uploads_refused", "SetWeights uploads refused, by status code", ["code"], registry=r
        )
        self.train_seconds = Counter("fedpi_worker_train_seconds", "Seconds spent training", registry=r)
        self.batches = Counter("fedpi_worker_batches", "Training batches completed", registry=r)
        self.samples = Counter("fedpi_worker_samples", "Training samples processed", registry=r)
        self.training = Gauge("fedpi_worker_training", "1 while a Train call is running", registry=r)
        self.weights_round = Gauge("fedpi_worker_weights_round", "Round of the installed weights", registry=r)
        self.info = Gauge("fedpi_worker_info", "Constant 1, labelled with the worker id", ["worker_id"], registry=r)
        self.info.labels(worker_id=worker_id).set(1)

    def watch_board(self, read: Callable[[], pb.BoardHealth]) -> None:
        """Board health as gauges, read at each scrape; a value the board cannot read is not exported."""
        self.registry.register(BoardCollector(read))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # one line naming the port, not a traceback
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None

    def count(self, method: str, code: grpc.StatusCode | int) -> None:
        if isinstance(code, int):  # grpc.aio may report a code by its number
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        self.rpcs.labels(method=method, code=code.name).inc()
        if method == "SetWeights" and code is not grpc.StatusCode.OK:
            self.uploads_refused.labels(code=code.name).inc()

    def trained(self, seconds: float, batches: int, samples: int) -> None:
        self.train_seconds.inc(seconds)
        self.batches.inc(batches)
        self.samples.inc(samples)


BOARD_GAUGES = {  # BoardHealth field: (metric, help)
    "cpu_temperature_celsius": ("fedpi_worker_cpu_temperature_celsius", "CPU temperature of the board"),
    "memory_available_bytes": ("fedpi_worker_memory_available_bytes", "Memory the worker's board or cgroup has left"),
    "under_voltage": ("fedpi_worker_under_voltage", "1 while the board is under-volted (Raspberry Pi firmware)"),
    "throttled": ("fedpi_worker_throttled", "1 while the board's CPU is throttled (Raspberry Pi firmware)"),
    "under_voltage_since_boot": ("fedpi_worker_under_voltage_since_boot", "1 if the board was under-volted since boot"),
    "throttled_since_boot": ("fedpi_worker_throttled_since_boot", "1 if the board was throttled since boot"),
}


class BoardCollector(Collector):
    def __init__(self, read: Callable[[], pb.BoardHealth]):
        self.read = read

    def collect(self):
        health = self.read()
        for field, (name, text) in BOARD_GAUGES.items():
            if health.HasField(field):
                yield GaugeMetricFamily(name, text, value=float(getattr(health, field)))


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method and the status code it ended with."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        @asynccontextmanager
        async def counted(context: grpc.aio.ServicerContext):
            try:
                yield
            except asyncio.CancelledError:  # the caller went away
                metrics.count(method, grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                metrics.count(method, context.code() or grpc.StatusCode.UNKNOWN)
                raise
            metrics.count(method, context.code() or grpc.StatusCode.OK)

        return wrap_handler(handler, counted)
