"""The coordinator's Prometheus metrics (prometheus-client), served on --metrics-port at /metrics while it runs."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.rounds import RoundReport
from generated.fedpi.v1 import worker_pb2 as pb


class PrometheusObserver(RunObserver):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.rounds_completed = Counter(
            "fedpi_rounds_completed", "Rounds whose aggregate became the global model", registry=r
        )
        self.rounds_failed = Counter("fedpi_rounds_failed", "Round attempts that missed their quorum", registry=r)
        self.rounds_planned = Gauge("fedpi_rounds_planned", "Rounds this run trains (--rounds)", registry=r)
        self.current_round = Gauge("fedpi_round", "The round training now (or last finished)", registry=r)
        self.test_accuracy = Gauge(
            "fedpi_test_accuracy", "Test accuracy of the global model after the last round", registry=r
        )
        self.test_loss = Gauge("fedpi_test_loss", "Test loss of the global model after the last round", registry=r)
        self.wall = Gauge("fedpi_round_wall_seconds", "Wall seconds of the last finished round", registry=r)
        self.overhead = Gauge(
            "fedpi_round_overhead_seconds",
            "Wall seconds of the last round beyond its slowest worker's training",
            registry=r,
        )
        self.bytes_sent = Counter("fedpi_bytes_sent", "Weight bytes sent to each worker", ["worker"], registry=r)
        self.bytes_received = Counter(
            "fedpi_bytes_received", "Weight bytes received from each worker", ["worker"], registry=r
        )
        self.failures = Counter(
            "fedpi_worker_failures", "Workers dropped from a round, by phase", ["worker", "phase"], registry=r
        )
        self.present = Gauge("fedpi_workers_present", "Workers that passed the handshake and take part", registry=r)
        # Asynchronous mode (--mode async): a version is a round above; these say how stale and how busy.
        self.staleness = Gauge(
            "fedpi_update_staleness",
            "Versions made since the model of each worker's last update",
            ["worker"],
            registry=r,
        )
        self.epsilon = Gauge(
            "fedpi_dp_epsilon", "Worker-level DP: epsilon spent so far, at the run's delta", registry=r
        )
        self.agreement = Gauge(
            "fedpi_update_agreement",
            "How alike the last round's updates were: their mean pairwise cosine (--server-optimizer auto)",
            registry=r,
        )
        self.idle = Gauge(
            "fedpi_worker_idle_fraction",
            "Share of the run each worker spent neither training nor moving weights",
            ["worker"],
            registry=r,
        )
        # Each board's health as its worker last reported it while training (absent if it cannot read it).
        self.board = {
            field: Gauge(f"fedpi_board_{field}", text, ["worker"], registry=r)
            for field, text in (
                ("cpu_temperature_celsius", "CPU temperature of the worker's board"),
                ("throttled", "1 while the worker's board is throttled (Raspberry Pi firmware)"),
                ("under_voltage", "1 while the worker's board is under-volted (Raspberry Pi firmware)"),
                ("memory_available_bytes", "Memory the worker's board or cgroup has left"),
                ("samples_per_second", "Training throughput of the worker's board"),
            )
        }

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # one line naming the port, not a traceback
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None

    def run_started(self, rounds: int, first_round: int, workers: Sequence[str]) -> None:
        self.rounds_planned.set(rounds)
        self.present.set(len(workers))

    def workers_present(self, workers: Sequence[str]) -> None:
        self.present.set(len(workers))

    def round_started(self, number: int, workers: Sequence[str]) -> None:
        self.current_round.set(number)

    def worker_phase(self, worker: str, phase: str, detail: str = "") -> None:
        if phase == "dropped":
            self.failures.labels(worker=worker, phase=detail.split(":", 1)[0]).inc()

    def worker_progress(self, worker: str, progress: pb.TrainProgress) -> None:
        for field, gauge in self.board.items():
            if progress.health.HasField(field):
                gauge.labels(worker=worker).set(float(getattr(progress.health, field)))

    def round_finished(self, report: RoundReport) -> None:
        self.rounds_completed.inc()
        if report.test_accuracy is not None:
            self.test_accuracy.set(report.test_accuracy)
            self.test_loss.set(report.test_loss)
        self.wall.set(report.wall_seconds)
        self.overhead.set(report.overhead_seconds)
        if report.dp_epsilon is not None:
            self.epsilon.set(report.dp_epsilon)
        if report.update_agreement is not None:
            self.agreement.set(report.update_agreement)
        if report.version is not None:
            self.current_round.set(report.version)  # no round starts: the newest version is the one in training
        for w in report.workers:
            self.bytes_sent.labels(worker=w.worker).inc(w.bytes_sent)
            self.bytes_received.labels(worker=w.worker).inc(w.bytes_received)
            if w.staleness is not None:
                self.staleness.labels(worker=w.worker).set(w.staleness)
        for worker, idle in (report.idle_fraction or {}).items():
            self.idle.labels(worker=worker).set(idle)

    def round_failed(self, number: int, reason: str) -> None:
        self.rounds_failed.inc()
