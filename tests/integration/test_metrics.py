"""Prometheus metrics scraped from a live worker and a live coordinator during a real run."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator_service.local import LocalWorker, free_port
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.integration.conftest import DIGITS, METADATA, start_cluster


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_worker_and_coordinator_metrics_during_a_run(tmp_path):
    ports = {name: free_port() for name in ("alice", "bob")}
    cluster = start_cluster(
        [
            LocalWorker(
                name, [*DIGITS, "--partition", f"{i}/2", "--metrics-port", str(port), "--train-delay", "0.05"], tmp_path
            )
            for i, (name, port) in enumerate(ports.items())
        ]
    )
    coordinator_port = free_port()
    try:
        # A refused call first: it must be counted with its status code.
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(cluster.workers[0].address))
        with pytest.raises(grpc.RpcError):
            list(
                stub.Train(
                    pb.TrainRequest(round=0, local_batches=1, batch_size=0, learning_rate=0.1),
                    metadata=METADATA,
                    timeout=10,
                )
            )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator_service",
                "train",
                "--workers",
                cluster.spec,
                "--rounds",
                "3",
                "--local-batches",
                "20",
                "--dataset",
                "digits-5k",
                "--output-dir",
                str(tmp_path / "run"),
                "--metrics-port",
                str(coordinator_port),
                "--metrics-host",
                "127.0.0.1",
                "--log-format",
                "json",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline, during = time.monotonic() + 120, None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    samples = scrape(coordinator_port)
                except OSError:
                    samples = {}
                if value(samples, "fedpi_rounds_completed_total") >= 1:
                    during = samples
                    break
                time.sleep(0.2)
            assert during is not None, "the coordinator's /metrics never showed a completed round"
            assert value(during, "fedpi_workers_present") == 2 and value(during, "fedpi_rounds_planned") == 3
            assert 0 < value(during, "fedpi_test_accuracy") <= 1 and value(during, "fedpi_round_wall_seconds") > 0
            assert value(during, "fedpi_bytes_received_total", worker="alice") == 431_080 * 4
            assert proc.wait(120) == 0
        finally:
            proc.kill()
        worker = scrape(ports["alice"])
        # Every Train is counted once, by its final code: OK, or CANCELLED when the coordinator's end of the call
        # closed first after the result had arrived.
        assert sum(value(worker, "fedpi_worker_rpcs_total", method="Train", code=c) for c in ("OK", "CANCELLED")) == 3
        assert value(worker, "fedpi_worker_rpcs_total", method="Train", code="INVALID_ARGUMENT") == 1
        assert value(worker, "fedpi_worker_rpcs_total", method="SetWeights", code="OK") == 3
        assert value(worker, "fedpi_worker_batches_total") == 60
        assert value(worker, "fedpi_worker_train_seconds_total") >= 60 * 0.05
        assert value(worker, "fedpi_worker_weights_round") == 3 and value(worker, "fedpi_worker_training") == 0
    finally:
        cluster.stop()
