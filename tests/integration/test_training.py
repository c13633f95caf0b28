"""A real coordinator process training real worker processes over gRPC on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
import torch

from coordinator_service.local import LocalWorker
from coordinator_service.policy.strategy import FedAvg
from fedpi.data import load_dataset, shard
from fedpi.models import build_model, evaluate
from tests.conftest import ROOT
from tests.integration.conftest import DIGITS, events, run_coordinator, start_cluster


def test_two_rounds_on_real_digits_clear_90_percent(digits_cluster, tmp_path):
    # Execute
    proc = run_coordinator(
        "train",
        "--workers",
        digits_cluster.spec,
        "--rounds",
        "2",
        "--dataset",
        "digits-5k",
        "--lr",
        "0.05",
        "--momentum",
        "0.5",
        "--local-batches",
        "50",
        "--lr-schedule",
        "constant",
        "--output-dir",
        str(tmp_path),
    )
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
    proc = run_coordinator(
        "train",
        "--workers",
        digits_cluster.spec,
        "--rounds",
        "1",
        "--model",
        "large-mlp",
        "--dataset",
        "digits-5k",
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 1
    failed = [e for e in events(proc.stdout) if e.get("event") == "worker_handshake_failed"]
    assert len(failed) == 3
    assert "runs model 'reference-cnn', coordinator trains 'large-mlp'" in failed[0]["reason"]


def test_unreachable_workers_fail_fast_with_a_clear_error(tmp_path):
    proc = run_coordinator(
        "train",
        "--workers",
        "ghost=127.0.0.1:1",
        "--rounds",
        "1",
        "--dataset",
        "digits-5k",
        "--rpc-timeout",
        "3",
        "--output-dir",
        str(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 1
    reasons = [e["reason"] for e in events(proc.stdout) if e.get("event") == "worker_unavailable"]
    assert reasons and ("UNAVAILABLE" in reasons[0] or "DEADLINE_EXCEEDED" in reasons[0])


def test_sampled_time_budgeted_rounds_with_fednova_and_federated_evaluation(digits_cluster, tmp_path):
    """Two of three workers per round (the seeded choice), each training for a second, FedNova's normalised average,
    and every round's model evaluated on the sampled workers' own test splits: the reported mean is recomputed here
    from model.pt and the workers' shards."""
    proc = run_coordinator(
        "train",
        "--workers",
        digits_cluster.spec,
        "--rounds",
        "2",
        "--dataset",
        "digits-5k",
        "--workers-per-round",
        "2",
        "--local-seconds",
        "1",
        "--federated-evaluation",
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = [w.name for w in digits_cluster.workers]
    for m in metrics:
        assert sorted(m["workers"]) == sorted(FedAvg(workers_per_round=2).sample(m["round"], names, names.index))
        assert all(w["batches"] >= 1 and w["train_seconds"] >= 1.0 for w in m["workers"].values())
        assert m["aggregate_scale"] >= 1.0
    model = build_model("reference-cnn")
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    digits = load_dataset("digits-5k", "unused", download=False)
    last = metrics[-1]
    per_worker = {n: evaluate(model, shard(digits, names.index(n), 3, "iid", 0).test) for n in last["workers"]}
    sizes = {n: len(shard(digits, names.index(n), 3, "iid", 0).test) for n in last["workers"]}
    expected = sum(per_worker[n][1] * sizes[n] for n in per_worker) / sum(sizes.values())
    assert last["federated_samples"] == sum(sizes.values())
    assert abs(last["federated_accuracy"] - expected) < 1e-4
    for n, (_loss, accuracy) in per_worker.items():
        assert abs(last["workers"][n]["eval_accuracy"] - accuracy) < 1e-4


def test_without_a_terminal_stdout_holds_only_json_events(digits_cluster, tmp_path):
    """No --log-format: stdout is a pipe here, so no live view and nothing but one JSON object per line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "train",
            "--workers",
            digits_cluster.spec,
            "--rounds",
            "1",
            "--local-batches",
            "5",
            "--dataset",
            "digits-5k",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    assert "round_finished" in {json.loads(line)["event"] for line in lines}


def test_evaluation_overlaps_the_next_round_and_gives_what_sequential_evaluation_gives(digits_cluster, tmp_path):
    """Round r's model is evaluated while round r+1 trains (round_started of r+1 comes before round_finished of r),
    and every figure and the final model equal those of a run that evaluates each round before the next."""
    runs = {}
    for mode, extra in (("overlapped", []), ("sequential", ["--sequential-evaluation"])):
        out = tmp_path / mode
        proc = run_coordinator(
            "train",
            "--workers",
            digits_cluster.spec,
            "--rounds",
            "3",
            "--dataset",
            "digits-5k",
            "--local-batches",
            "5",
            "--seed",
            "4",
            "--output-dir",
            str(out),
            *extra,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        order = [
            (e["event"], e["round"])
            for e in events(proc.stdout)
            if e.get("event") in ("round_started", "round_finished")
        ]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[mode] = order, metrics, torch.load(out / "model.pt")
    overlapped, sequential = runs["overlapped"], runs["sequential"]
    assert overlapped[0].index(("round_started", 2)) < overlapped[0].index(("round_finished", 1))
    assert sequential[0] == [
        ("round_started", 1),
        ("round_finished", 1),
        ("round_started", 2),
        ("round_finished", 2),
        ("round_started", 3),
        ("round_finished", 3),
    ]
    scores = lambda metrics: [(m["round"], m["test_accuracy"], m["test_loss"]) for m in metrics]  # noqa: E731
    assert scores(overlapped[1]) == scores(sequential[1])
    assert all(m["evaluation_seconds"] > 0 for m in overlapped[1])
    assert all(torch.equal(overlapped[2][k], sequential[2][k]) for k in sequential[2])


def test_compressed_updates_move_the_bytes_they_promise_and_learn_like_raw_ones(digits_cluster, tmp_path):
    """fp16 sends half the bytes up, int8 deltas a quarter (plus a scale per chunk); the global model goes down
    exact either way, and two rounds end within a point of the uncompressed run's accuracy."""
    params = 431_080
    runs = {}
    for compression in ("none", "fp16", "int8"):
        out = tmp_path / compression
        proc = run_coordinator(
            "train",
            "--workers",
            digits_cluster.spec,
            "--rounds",
            "2",
            "--dataset",
            "digits-5k",
            "--local-batches",
            "20",
            "--seed",
            "5",
            "--compression",
            compression,
            "--output-dir",
            str(out),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[compression] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for compression, up in (("none", params * 4), ("fp16", params * 2), ("int8", None)):
        for w in runs[compression][-1]["workers"].values():
            assert w["bytes_sent"] == params * 4
            if up is not None:
                assert w["bytes_received"] == up, compression
            else:  # one byte per weight and a 4-byte scale per chunk of at most 1 MiB of one tensor
                assert params < w["bytes_received"] < params + 4 * 20
    accuracy = {c: runs[c][-1]["test_accuracy"] for c in runs}
    assert abs(accuracy["fp16"] - accuracy["none"]) <= 0.01 and abs(accuracy["int8"] - accuracy["none"]) <= 0.01, (
        accuracy
    )
    assert accuracy["fp16"] != accuracy["none"] or runs["fp16"][-1]["test_loss"] != runs["none"][-1]["test_loss"]


@pytest.fixture(scope="module")
def labels_cluster(tmp_path_factory):
    """Three workers of which each holds only some of the digits (0-3, 4-6, 7-9)."""
    logs = tmp_path_factory.mktemp("labels")
    names = ["alice", "bob", "charlie"]
    args = [*DIGITS, "--partition-scheme", "labels"]
    cluster = start_cluster([LocalWorker(n, [*args, "--partition", f"{i}/3"], logs) for i, n in enumerate(names)])
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("split, chosen", [("iid", "fedavg"), ("labels", "feddyn")])
def test_auto_runs_feddyn_from_round_2_when_the_workers_hold_different_digits(split, chosen, request, tmp_path):
    """No flags: round 1 is FedAvg and measures how alike the updates are; rounds 2 and 3 run what it chose, FedDyn's
    requests accepted by every real worker."""
    cluster = request.getfixturevalue("digits_cluster" if split == "iid" else "labels_cluster")
    proc = run_coordinator(
        "train", "--workers", cluster.spec, "--rounds", "3", "--dataset", "digits-5k", "--local-batches", "10",
        "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["server_optimizer"] for m in metrics] == ["fedavg", chosen, chosen]
    assert all(len(m["workers"]) == 3 and not m["failures"] for m in metrics)
    agreement = metrics[0]["update_agreement"]
    assert agreement < 0.4 if chosen == "feddyn" else agreement > 0.4
    [choice] = [e for e in events(proc.stdout) if e.get("event") == "server_optimizer_chosen"]
    assert (choice["server_optimizer"], choice["round"], choice["update_agreement"]) == (chosen, 1, agreement)
    for w in cluster.workers:  # each trained rounds 2 and 3 with FedDyn's regulariser, or none of them
        finished = [e for e in events(w.log_path.read_text()) if e.get("event") == "training_finished"][-3:]
        assert [e.get("feddyn_alpha", 0) for e in finished] == [0, *[0.1 if chosen == "feddyn" else 0] * 2], w.name


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_a_demo_stopped_by_a_signal_stops_its_local_workers(sig, tmp_path):
    """`timeout` or a service manager ends `fedpi demo` mid-run: none of its worker processes outlives it. (SIGINT is
    left out: a shell that starts the tests in the background makes its children ignore it.)"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator_service", "demo", "--local-workers", "2", "--dataset", "digits-5k",
         "--rounds", "50", "--output-dir", str(tmp_path), "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        addresses = []
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            addresses = event.get("workers", addresses) if event.get("event") == "local_workers_starting" else addresses
            if event.get("event") == "round_started":
                break
        assert len(addresses) == 2
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    for address in addresses:
        host, port = address.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
