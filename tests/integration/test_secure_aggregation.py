"""Secure aggregation with five real workers: the unmasked model equals plain FedAvg of the same updates within the
quantisation bound the round reports; a worker that drops before its masked upload is left out and one that drops
after it is recovered from the others' shares; below the threshold the round fails and the model is kept."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator_service.local import LocalWorker
from tests.integration.conftest import DIGITS, events, run_coordinator, start_cluster

# A long scenario (five real workers a round, runs with and without masking, dropouts and a failing round):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario

NAMES = ["alice", "bob", "charlie", "dave", "erin"]
ROUND = ["--dataset", "digits-5k", "--local-batches", "5", "--round-retries", "0", "--handshake-timeout", "5"]


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    cluster = start_cluster([LocalWorker(n, [*DIGITS, "--partition", f"{i}/5"], logs) for i, n in enumerate(NAMES)])
    yield cluster
    cluster.stop()


def train(cluster, out, *extra: str, rounds: int = 1):
    done = run_coordinator("train", "--workers", cluster.spec, "--rounds", str(rounds), *ROUND, *extra,
                           "--output-dir", str(out))  # fmt: skip
    return done, events(done.stdout)


def model(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def rounds(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_model(five, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    done, _ = train(five, out)
    assert done.returncode == 0, done.stdout[-2000:]
    return model(out), rounds(out)[0]


@pytest.mark.parametrize("neighbours, threshold", [(0, 3), (2, 2)], ids=["secagg", "secagg-plus"])
def test_the_unmasked_model_is_plain_fedavg_within_the_quantization_bound(five, plain_model, tmp_path, neighbours,
                                                                          threshold):  # fmt: skip
    secure, log = train(five, tmp_path, "--secure-aggregation", "--secagg-neighbours", str(neighbours))
    assert secure.returncode == 0, secure.stdout[-2000:]
    report = rounds(tmp_path)[0]
    info = report["secure_aggregation"]
    assert (info["workers"], info["neighbours"], info["threshold"]) == (5, neighbours or 4, threshold)
    assert info["clipped_coordinates"] == 0 and info["dropped_after_sharing"] == []
    bound = info["quantization_error_bound"]
    assert 0 < bound < 1e-7
    a, b = plain_model[0], model(tmp_path)
    for k in a:
        x, y = a[k].double(), b[k].double()
        # Within the bound on the mean, plus one float32 rounding of each model's weights (at most eps x |w|).
        slack = bound + torch.finfo(torch.float32).eps * torch.maximum(x.abs(), y.abs())
        assert bool(((x - y).abs() <= slack).all()), (k, float((x - y).abs().max()), bound)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # quantised: not the plain path under another name
    assert report["samples"] == plain_model[1]["samples"]
    assert any(e.get("event") == "secagg_unmasked" and e["survivors"] == 5 for e in log)


def test_distributed_dp_is_the_central_dp_mean_and_adaptive_clip_with_the_noise_turned_down(five, tmp_path):
    """The same two rounds with worker-level DP on the coordinator and with the workers noising their own masked
    updates: with the noise turned down, the same clip norms, round by round (adaptive clipping learns from the count
    the workers masked), and the same model. The noise itself is measured in
    tests/coordinator_service/test_secure.py."""
    dp = ["--dp-noise-multiplier", "1e-6", "--dp-clip-norm", "0.43", "--dp-clip-quantile", "0.5",
          "--dp-clipped-count-stddev", "1e-6"]  # fmt: skip
    keep = ["--keep-round-models", "2"]
    central, _ = train(five, tmp_path / "central", *dp, *keep, rounds=2)
    assert central.returncode == 0, central.stdout[-2000:]
    distributed, log = train(five, tmp_path / "distributed", *dp, *keep, "--secure-aggregation", rounds=2)
    assert distributed.returncode == 0, distributed.stdout[-2000:]
    a_and_b = ("central", "distributed")
    a, b = (rounds(tmp_path / run) for run in a_and_b)
    for x, y in zip(a, b):
        assert y["dp_clipping"]["clip_norm"] == pytest.approx(x["dp_clipping"]["clip_norm"], rel=1e-4)
        assert y["dp_clipping"]["next_clip_norm"] == pytest.approx(x["dp_clipping"]["next_clip_norm"], rel=1e-4)
        assert y["dp_epsilon"] == x["dp_epsilon"] and "secure_aggregation" in y
        assert y["dp_epsilon_coordinator"] == y["dp_epsilon"] and "dp_epsilon_coordinator" not in x  # 5 of 5 sampled
    assert 0 < a[0]["dp_clipping"]["clipped"] < 5  # the clip sat among the updates' norms
    assert a[0]["dp_clipping"]["next_clip_norm"] != 0.43
    # Round 1's models: each run's noise (deviation about 1e-7 a weight) out to 6 deviations; later rounds train
    # from these and drift apart by more.
    ma, mb = (torch.load(tmp_path / run / "rounds" / "round-1.pt", weights_only=True) for run in a_and_b)
    for k in ma:
        assert torch.allclose(ma[k].double(), mb[k].double(), atol=2e-6, rtol=0), (k, (ma[k] - mb[k]).abs().max())
    assert any(e.get("event") == "dp_noise_added" and "clipped" not in e for e in log)


@pytest.fixture(scope="module")
def dropping(tmp_path_factory):
    """alice, bob and charlie honest; dave drops after sharing (its Train fails), erin after its masked upload."""
    logs = tmp_path_factory.mktemp("dropping")
    args = lambda i: [*DIGITS, "--partition", f"{i}/5"]  # noqa: E731
    workers = [LocalWorker(n, args(i), logs) for i, n in enumerate(NAMES[:3])]
    workers.append(LocalWorker("dave", ["--drop", "train", *args(3)], logs, module="tests.dropout_worker"))
    workers.append(LocalWorker("erin", ["--drop", "unmask", *args(4)], logs, module="tests.dropout_worker"))
    cluster = start_cluster(workers)
    yield cluster
    cluster.stop()


def test_a_worker_dropped_before_and_one_after_the_masked_upload_and_the_sum_is_still_fedavg(dropping, tmp_path):
    """Plain FedAvg on the same workers is FedAvg of alice, bob, charlie and erin (dave's Train fails there too); the
    secure round unmasks the same sum: dave's pairwise masks rebuilt from his key's shares, erin's self mask from
    hers, though neither answers."""
    plain, _ = train(dropping, tmp_path / "plain")
    secure, log = train(dropping, tmp_path / "secure", "--secure-aggregation")
    assert plain.returncode == 0, plain.stdout[-2000:]
    assert secure.returncode == 0, secure.stdout[-2000:]
    report = rounds(tmp_path / "secure")[0]
    assert sorted(report["workers"]) == ["alice", "bob", "charlie", "erin"]
    assert report["secure_aggregation"]["dropped_after_sharing"] == ["dave"]
    assert any(e.get("event") == "secagg_unmask_missing" and e["worker"] == "erin" for e in log)
    bound = report["secure_aggregation"]["quantization_error_bound"]
    a, b = model(tmp_path / "plain"), model(tmp_path / "secure")
    for k in a:
        x, y = a[k].double(), b[k].double()
        slack = bound + torch.finfo(torch.float32).eps * torch.maximum(x.abs(), y.abs())
        assert bool(((x - y).abs() <= slack).all()), (k, float((x - y).abs().max()), bound)


def test_below_the_threshold_the_round_fails_with_the_reason_and_the_model_is_kept(dropping, tmp_path):
    """Threshold 4 of the 5 holders of each secret: four masked updates arrive, but with dave gone and erin silent
    only three holders of each seed answer."""
    done, log = train(dropping, tmp_path, "--secure-aggregation", "--secagg-threshold", "4")
    assert done.returncode != 0
    failed = next(e for e in log if e.get("event") == "training_failed")
    assert "shares of worker" in failed["reason"] and "3 of the 4 shares" in failed["reason"], failed
    assert "the global model is unchanged" in failed["reason"]
    assert not any(e.get("event") == "round_finished" for e in log)
