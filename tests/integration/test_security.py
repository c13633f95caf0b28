"""Authentication, TLS and mutual TLS against real workers and a real coordinator."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator_service.local import LocalWorker
from fedpi.net import certs
from fedpi.net.protocol import PROTOCOL_VERSION, VERSION_METADATA_KEY
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.integration.conftest import DIGITS, events, run_coordinator, start_cluster

VERSION = (VERSION_METADATA_KEY, PROTOCOL_VERSION)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    certs.make_all(out, workers=2, names=["w0", "w1"])
    ca = certs.make_ca(out)
    # Signed by the same CA and good for client auth, but not the coordinator: must be refused.
    certs.issue(out, "intruder", "pi-3", [], ca, server=False, client=True)
    return out


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def token_worker(pki, tmp_path_factory):
    cluster = start_cluster(
        [LocalWorker("guarded", [*DIGITS, "--token-file", str(pki / "token")], tmp_path_factory.mktemp("logs"))]
    )
    channel = grpc.insecure_channel(cluster.workers[0].address)
    yield channel, (pki / "token").read_text().strip()
    channel.close()
    cluster.stop()


def test_call_without_token_is_unauthenticated(token_worker):
    channel, _ = token_worker
    code, details = _code(lambda: pb_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details


def test_wrong_token_is_unauthenticated_and_never_echoed(token_worker):
    channel, token = token_worker
    wrong = token[:-1] + ("x" if token[-1] != "x" else "y")
    code, details = _code(
        lambda: pb_grpc.WorkerStub(channel).GetInfo(
            pb.GetInfoRequest(), metadata=(("authorization", f"Bearer {wrong}"),), timeout=10
        )
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and wrong not in details


def test_right_token_is_served(token_worker):
    channel, token = token_worker
    info = pb_grpc.WorkerStub(channel).GetInfo(
        pb.GetInfoRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
    )
    assert info.worker_id == "guarded"


def test_streaming_calls_are_guarded_too(token_worker):
    channel, _ = token_worker
    code, _ = _code(lambda: list(pb_grpc.WorkerStub(channel).GetWeights(pb.GetWeightsRequest(), timeout=10)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: pb_grpc.WorkerStub(channel).SetWeights(iter([pb.WeightsChunk()]), timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_health_check_needs_no_token(token_worker):
    channel, _ = token_worker
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _tls_workers(pki, logs, mutual: bool, certificates=("w0", "w1")):
    """Two workers w0 and w1, each serving the certificate named in `certificates`."""
    args = [*DIGITS, "--token-file", str(pki / "token")]
    if mutual:
        args += ["--tls-client-ca", str(pki / "ca.crt"), "--client-identity", certs.COORDINATOR_IDENTITY]
    return start_cluster(
        [
            LocalWorker(
                f"w{i}",
                [
                    *args,
                    "--partition",
                    f"{i}/2",
                    "--tls-cert",
                    str(pki / f"{cert}.crt"),
                    "--tls-key",
                    str(pki / f"{cert}.key"),
                ],
                logs,
                health_port=True,
            )
            for i, cert in enumerate(certificates)
        ]
    )


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_full_run_over_tls(pki, tmp_path, mutual):
    cluster = _tls_workers(pki, tmp_path / "logs", mutual)
    try:
        extra = (
            ["--tls-cert", str(pki / "coordinator.crt"), "--tls-key", str(pki / "coordinator.key")] if mutual else []
        )
        proc = run_coordinator(
            "train",
            "--workers",
            cluster.spec,
            "--rounds",
            "1",
            "--dataset",
            "digits-5k",
            "--local-batches",
            "5",
            "--token-file",
            str(pki / "token"),
            "--tls-ca",
            str(pki / "ca.crt"),
            *extra,
            "--output-dir",
            str(tmp_path / "out"),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        [metrics] = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
        assert sorted(metrics["workers"]) == ["w0", "w1"]
        if mutual:
            # A certificate from the same CA that is not the coordinator's is refused with PERMISSION_DENIED.
            credentials = grpc.ssl_channel_credentials(
                (pki / "ca.crt").read_bytes(), (pki / "intruder.key").read_bytes(), (pki / "intruder.crt").read_bytes()
            )
            with grpc.secure_channel(cluster.workers[0].address, credentials) as channel:
                code, details = _code(
                    lambda: pb_grpc.WorkerStub(channel).GetInfo(
                        pb.GetInfoRequest(),
                        metadata=(("authorization", "Bearer " + (pki / "token").read_text().strip()),),
                        timeout=10,
                    )
                )
            assert code == grpc.StatusCode.PERMISSION_DENIED and "pi-3" in details
            # Without any client certificate the TLS handshake itself fails.
            proc = run_coordinator(
                "train",
                "--workers",
                cluster.spec,
                "--rounds",
                "1",
                "--dataset",
                "digits-5k",
                "--token-file",
                str(pki / "token"),
                "--tls-ca",
                str(pki / "ca.crt"),
                "--rpc-timeout",
                "5",
                "--handshake-timeout",
                "5",
                "--output-dir",
                str(tmp_path / "out2"),
            )
            assert proc.returncode == 1
    finally:
        cluster.stop()


def test_plaintext_client_cannot_talk_to_a_tls_worker(pki, tmp_path):
    cluster = _tls_workers(pki, tmp_path / "logs", mutual=False)
    try:
        with grpc.insecure_channel(cluster.workers[0].address) as channel:
            code, _ = _code(
                lambda: pb_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), metadata=(VERSION,), timeout=5)
            )
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        cluster.stop()


def test_a_worker_presenting_another_workers_certificate_is_refused(pki, tmp_path):
    """w1 serves w0's certificate (a key copied off another Pi): valid, same CA, but it does not name w1."""
    cluster = _tls_workers(pki, tmp_path / "logs", mutual=False, certificates=("w0", "w0"))
    try:
        proc = run_coordinator(
            "train",
            "--workers",
            cluster.spec,
            "--rounds",
            "1",
            "--dataset",
            "digits-5k",
            "--local-batches",
            "2",
            "--token-file",
            str(pki / "token"),
            "--tls-ca",
            str(pki / "ca.crt"),
            "--min-workers",
            "2",
            "--round-retries",
            "0",
            "--handshake-timeout",
            "5",
            "--output-dir",
            str(tmp_path / "out"),
        )
        assert proc.returncode == 1
        [refusal] = [e for e in events(proc.stdout) if e.get("event") == "worker_handshake_failed"]
        assert refusal["worker"] == "w1" and "certificate does not name 'w1'" in refusal["reason"]
    finally:
        cluster.stop()
