"""One compromised worker of five, as real processes: it trains, then sends a poisoned update (tests.poison_worker).
Robust aggregation keeps the model within 2 points of the clean run where FedAvg does not; the update bound and the
sample bound refuse what no honest worker sends; the global model stays finite whatever arrives."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator_service.local import LocalWorker
from tests.integration.conftest import DIGITS, events, run_coordinator, start_cluster

# A long scenario (five workers, one malicious, under every rule):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario

HONEST = ["alice", "bob", "charlie", "dave"]
ATTACKS = ("scaled:40", "huge")
TRAIN = [
    "--dataset",
    "digits-5k",
    "--local-batches",
    "20",
    "--lr",
    "0.05",
    "--momentum",
    "0.5",
    "--min-workers",
    "3",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The four honest workers, an honest fifth, and the fifth's poisoned twins (same shard), one per attack."""
    logs = tmp_path_factory.mktemp("poison")
    workers = [LocalWorker(n, [*DIGITS, "--partition", f"{i}/5"], logs) for i, n in enumerate(HONEST)]
    workers.append(LocalWorker("mallory", [*DIGITS, "--partition", "4/5"], logs))
    for attack in ATTACKS:
        workers.append(
            LocalWorker(
                f"mallory-{attack.split(':')[0]}",
                [*DIGITS, "--partition", "4/5", "--attack", attack],
                logs,
                module="tests.poison_worker",
            )
        )
    cluster = start_cluster(workers)
    yield {w.name: w for w in cluster.workers}
    cluster.stop()


def _train(cluster, tmp_path, fifth: str, rule: str, rounds: int = 3) -> list[dict]:
    spec = ",".join(f"{n}={cluster[n].address}" for n in HONEST) + f",mallory={cluster[fifth].address}"
    out = tmp_path / f"{fifth}-{rule}"
    proc = run_coordinator(
        "train", "--workers", spec, *TRAIN, "--rounds", str(rounds), "--aggregation", rule, "--output-dir", str(out)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    return [e for e in events(proc.stdout) if e.get("event") == "round_finished"]


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory):
    """Test accuracy per round with five honest workers."""
    return [r["test_accuracy"] for r in _train(cluster, tmp_path_factory.mktemp("clean"), "mallory", "fedavg")]


def test_fedavg_is_poisoned_by_a_boosted_update(cluster, clean, tmp_path):
    # One round is enough: after it the honest workers' own updates from the wrecked model often exceed the bound.
    [first] = _train(cluster, tmp_path, "mallory-scaled", "fedavg", rounds=1)
    assert first["test_accuracy"] < clean[0] - 0.10, (first["test_accuracy"], clean[0])


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "clipped"])
def test_robust_rules_keep_the_clean_accuracy_under_a_boosted_update(cluster, clean, tmp_path, rule):
    rounds = _train(cluster, tmp_path, "mallory-scaled", rule)
    assert abs(rounds[-1]["test_accuracy"] - clean[-1]) <= 0.02, (rounds[-1]["test_accuracy"], clean[-1])
    assert all(r["aggregation"] == rule for r in rounds)


def test_finite_but_huge_values_are_refused_every_round_and_the_model_stays_finite(cluster, clean, tmp_path):
    """1e36 in every weight: without the update bound a float32 FedAvg sum overflows to inf."""
    rounds = _train(cluster, tmp_path, "mallory-huge", "fedavg")
    for r in rounds:
        [failure] = r["failures"]
        assert (failure["worker"], failure["phase"]) == ("mallory", "get_weights")
        assert "lies more than" in failure["reason"] and sorted(r["workers"]) == HONEST
    assert math.isfinite(rounds[-1]["test_loss"])
    assert abs(rounds[-1]["test_accuracy"] - clean[-1]) <= 0.05
