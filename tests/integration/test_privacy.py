"""Worker-level differential privacy with real workers: every round reports the epsilon the accountant gives, and
the run ends, finished and saved, before a round would spend more than --dp-target-epsilon."""

from __future__ import annotations

import json

import pytest

from coordinator_service.policy.privacy import Accountant
from tests.integration.conftest import events, run_coordinator

# A long scenario (real runs to a privacy budget, DP-SGD on every worker, a resumed adaptive-clipping run):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario

# Noise of 1 x the clip norm on the sum of 3 updates, each clipped to 0.003: small enough for the model to stay sane.
DP = ["--dp-noise-multiplier", "1", "--dp-clip-norm", "0.003"]


def test_the_run_reports_epsilon_every_round_and_stops_at_its_budget(digits_cluster, tmp_path):
    accountant = Accountant(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5)  # 3 of 3 workers every round
    target = (accountant.epsilon(3) + accountant.epsilon(4)) / 2
    done = run_coordinator("train", "--workers", digits_cluster.spec, "--rounds", "10", "--dataset", "digits-5k",
                           "--local-batches", "5", *DP, "--dp-target-epsilon", f"{target:.6f}", "--output-dir",
                           str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    log = events(done.stdout)
    stop = next(e for e in log if e.get("event") == "privacy_budget_reached")
    assert stop["round"] == 4 and stop["epsilon"] <= target < stop["would_be"]
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["dp_epsilon"] for r in rounds] == [round(accountant.epsilon(n), 4) for n in (1, 2, 3)]
    assert (tmp_path / "model.pt").is_file()
    assert any(e.get("event") == "dp_noise_added" and e["noise_std"] == round(0.003 / 3, 6) for e in log)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["dp_noise_multiplier"], config["dp_sample_rate"], config["dp_delta"]) == (1.0, 1.0, 1e-5)


def test_dp_sgd_workers_report_their_epsilon_and_no_round_takes_one_past_the_budget(digits_cluster, tmp_path):
    """Each real worker trains with DP-SGD and reports its own epsilon; the coordinator foresees it from the shard
    sizes and starts no round that would pass the budget."""
    from coordinator_service.policy.privacy import SampleAccountant

    sgd = SampleAccountant(noise_multiplier=1.5, delta=1e-5, batch_size=64, local_batches=10, local_epochs=0)
    shard = 4000 // 3  # the digits cluster's workers each hold a third of the 4,000 training digits
    target = (sgd.epsilon(2, shard) + sgd.epsilon(3, shard)) / 2
    done = run_coordinator("train", "--workers", digits_cluster.spec, "--rounds", "10", "--dataset", "digits-5k",
                           "--local-batches", "10", "--dp-sgd-noise-multiplier", "1.5", "--dp-sgd-max-grad-norm", "1",
                           "--dp-target-epsilon", f"{target:.6f}", "--output-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    stop = next(e for e in events(done.stdout) if e.get("event") == "privacy_budget_reached")
    assert stop["round"] == 3 and stop["guarantee"].startswith("DP-SGD on ")
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        reported = {name: w["dp_epsilon"] for name, w in r["workers"].items()}
        assert len(reported) == 3
        for name, epsilon in reported.items():
            shard_of = {"alice": 1334, "bob": 1333, "charlie": 1333}.get(name, shard)
            assert epsilon == pytest.approx(sgd.epsilon(r["round"], shard_of), rel=1e-3), name
        assert r["dp_sgd_epsilon"] == max(reported.values())
    assert rounds[-1]["test_accuracy"] > 0.5  # it still learns


def test_adaptive_clipping_moves_the_clip_each_round_and_a_resumed_run_goes_on_from_the_checkpointed_one(
    digits_cluster, tmp_path
):
    """Round r + 1 clips to the norm round r moved to, across a resume too: the clip is checkpointed state."""
    adaptive = ["--dp-noise-multiplier", "1", "--dp-clip-norm", "0.003", "--dp-clip-quantile", "0.5"]
    common = ["--workers", digits_cluster.spec, "--dataset", "digits-5k", "--local-batches", "5", *adaptive,
              "--output-dir", str(tmp_path)]  # fmt: skip
    first = run_coordinator("train", *common, "--rounds", "2")
    assert first.returncode == 0, first.stdout[-2000:]
    resumed = run_coordinator("train", *common, "--rounds", "4", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    clips = [r["dp_clipping"] for r in rounds]
    assert clips[0]["clip_norm"] == 0.003
    for before, after in zip(clips, clips[1:]):
        assert after["clip_norm"] == pytest.approx(before["next_clip_norm"], rel=1e-5)
        assert 0 <= before["clipped"] <= 3 and "unclipped_share" in before
    # 1 x 0.003 / 3 with z = 1 and count noise 1: the sum's multiplier is (1 - 1/4)^(-1/2)
    assert clips[0]["noise_std"] == round(0.003 / 3 * (1 - 0.25) ** -0.5, 6)
    assert len({c["clip_norm"] for c in clips}) == 4  # it moved every round
