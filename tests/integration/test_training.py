"""A real coordinator process training real worker processes over gRPC on 127.0.0.1."""

from __future__ import annotations

import json

import torch

from fedpi.models import build_model
from tests.integration.conftest import events, run_coordinator


def test_two_rounds_on_real_digits_clear_90_percent(digits_cluster, tmp_path):
    # Execute
    proc = run_coordinator("train", "--workers", digits_cluster.spec, "--rounds", "2", "--dataset", "digits-5k",
                           "--lr", "0.05", "--momentum", "0.5", "--output-dir", str(tmp_path))
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    assert metrics[-1]["test_accuracy"] >= 0.90, metrics[-1]
    assert set(metrics[-1]["workers"]) == {"alice", "bob", "charlie"}
    for w in metrics[-1]["workers"].values():
        assert 3000 < w["samples"] <= 50 * 64  # 50 batches of 64; an epoch's last batch is shorter
        assert w["bytes_received"] == w["bytes_sent"] == 431_080 * 4
    logged = [e for e in events(proc.stdout) if e.get("event") == "round_finished"]
    assert [e["round"] for e in logged] == [1, 2]
    assert {"test_loss", "wall_seconds", "aggregation_seconds", "overhead_seconds"} <= logged[0].keys()
    model = build_model("reference-cnn")
    model.load_state_dict(torch.load(tmp_path / "model.pt"))


def test_coordinator_refuses_workers_of_another_architecture(digits_cluster, tmp_path):
    proc = run_coordinator("train", "--workers", digits_cluster.spec, "--rounds", "1", "--model", "large-mlp",
                           "--dataset", "digits-5k", "--output-dir", str(tmp_path))
    assert proc.returncode == 1
    failed = [e for e in events(proc.stdout) if e.get("event") == "worker_handshake_failed"]
    assert len(failed) == 3
    assert "runs model 'reference-cnn', coordinator trains 'large-mlp'" in failed[0]["reason"]


def test_unreachable_workers_fail_fast_with_a_clear_error(tmp_path):
    proc = run_coordinator("train", "--workers", "ghost=127.0.0.1:1", "--rounds", "1", "--dataset", "digits-5k",
                           "--rpc-timeout", "3", "--output-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 1
    reasons = [e["reason"] for e in events(proc.stdout) if e.get("event") == "worker_unavailable"]
    assert reasons and ("UNAVAILABLE" in reasons[0] or "DEADLINE_EXCEEDED" in reasons[0])
