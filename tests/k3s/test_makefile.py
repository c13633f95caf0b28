"""The deployment targets cannot reach a cluster here; check that they expand to the intended commands."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT


def _dry_run(target: str, *variables: str) -> str:
    proc = subprocess.run(
        ["make", "-n", target, "KUBECTL=kubectl", *variables], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "target, expected",
    [
        (
            "deploy",
            [
                "fedpi.net.certs",
                "--print-secrets",
                "| kubectl apply -f -",
                "rollout status statefulset/fedpi-worker-$i",
                "rollout status deployment/fedpi-coordinator",
            ],
        ),
        (
            "train",
            [
                "port-forward service/fedpi-coordinator 50050:50050",
                "fedpi runs --coordinator 127.0.0.1:50050",
                "--tls-cert certs/operator.crt",
                "--token-file certs/operator-token",
                "start",
                "--watch",
            ],
        ),
        ("runs", ["port-forward service/fedpi-coordinator", "--token-file certs/operator-token list"]),
        ("status", ["get deployment,statefulset,pods,pvc"]),
        (
            "undeploy",
            [
                "delete --ignore-not-found deployment/fedpi-coordinator service/fedpi-coordinator",
                "statefulset -l app.kubernetes.io/component=worker",
            ],
        ),
        ("probe", ["port-forward pod/fedpi-worker-0-0", "grpc.health.v1.Health/Check", "-servername fedpi-worker-0"]),
        ("image", ["docker buildx build --platform linux/arm64,linux/amd64"]),
    ],
)
def test_targets_expand_to_kubectl_commands(target, expected):
    out = _dry_run(target)
    for fragment in expected:
        assert fragment in out, out


def test_settings_reach_the_renderer():
    out = _dry_run("deploy", "OVERLAY=local", "NAMESPACE=lab", "IMAGE=reg/fedpi", "TAG=9", "WORKERS=5")
    assert "k3s/render local lab reg/fedpi 9 5" in out and "-n lab" in out


def test_train_resumes_a_named_run_or_sets_settings_and_model_downloads_one():
    assert "resume 20261126-0400" in _dry_run("train", "RESUME=20261126-0400")
    assert "start --run-id lab-1 --set lr=0.1 --set local-seconds=20" in _dry_run(
        "train", "RUN=lab-1", "SET=lr=0.1 local-seconds=20"
    )
    assert "model 20261126-0400 -o model-20261126-0400.pt" in _dry_run("model", "RUN=20261126-0400")
    assert ".venv/bin/grpcurl" in _dry_run("probe")


def test_certs_need_only_cryptography():
    out = _dry_run("certs", "CERTS_VENV=build/no-such-venv")
    assert "build/no-such-venv/bin/pip install" in out and "'cryptography" in out and ".[dev]" not in out


def test_run_trains_the_task_named_by_task():
    assert "--task breast-cancer" in _dry_run("run", "TASK=breast-cancer")
    assert "--task" not in _dry_run("run")
