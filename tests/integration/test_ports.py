"""A port is one process's: a second worker or coordinator on a taken port fails to start with one line naming it,
and the first keeps every connection (gRPC's SO_REUSEPORT would have split them between the two)."""

from __future__ import annotations

import subprocess
import sys

import grpc

from coordinator_service.local import free_port
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.integration.conftest import DIGITS


def _worker(name: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker_service", "--id", name, *DIGITS, "--log-format", "json", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_second_worker_on_a_taken_port_fails_and_the_first_keeps_every_call(worker):
    first, _ = worker
    port = first.address.rsplit(":", 1)[1]
    proc = _worker("intruder", "--port", port)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "add_port" not in proc.stderr  # no gRPC C-core log line before ours
    assert f"cannot listen on 127.0.0.1:{port}: is another process using the port?" in proc.stdout
    with grpc.insecure_channel(first.address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        assert {stub.GetInfo(pb.GetInfoRequest(), timeout=10).worker_id for _ in range(8)} == {"solo"}


def test_a_taken_metrics_or_health_port_is_one_line_naming_it(worker):
    first, _ = worker
    taken = first.address.rsplit(":", 1)[1]
    for flag in ("--metrics-port", "--health-port"):
        proc = _worker("w", "--port", str(free_port()), flag, taken)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert f"127.0.0.1:{taken}" in proc.stdout


def test_a_second_coordinator_on_a_taken_port_fails(worker, tmp_path):
    first, _ = worker
    port = first.address.rsplit(":", 1)[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "serve",
            "--port",
            port,
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2
        and f"cannot listen on 127.0.0.1:{port}" in proc.stdout
        and "Traceback" not in proc.stdout + proc.stderr
    )
