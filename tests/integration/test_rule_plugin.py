"""An aggregation rule written only against coordinator_service.policy.rules, here in this file, trains a real run:
real workers, the real `fedpi train`, real gRPC. Nothing else in fedpi knows of it.

The rule is a trimmed variant: per coordinate, the mean without the single largest and smallest value, computed as
(sum - max - min) / (n - 2) instead of by sorting. On the same workers and seed it must give the built-in
`trimmed-mean:1`'s model to float32 rounding, and a model FedAvg's is measurably far from."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from coordinator_service.policy.rules import AggregationRule, register
from tests.conftest import ROOT
from tests.integration.conftest import events


@register
@dataclass(frozen=True)
class ExtremesDropped(AggregationRule):
    name: ClassVar[str] = "extremes-dropped"
    streams: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False

    def minimum_workers(self) -> int:
        return 3

    async def combine(self, updates):
        return await updates.walk(self.reduce_for)

    @staticmethod
    def reduce_for(n: int):
        if n < 3:
            raise ValueError(f"extremes-dropped needs 3 updates, got {n}")
        return lambda stack: (stack.sum(0) - stack.amax(0) - stack.amin(0)) / (n - 2)


# The rule is registered by importing this module: the coordinator's process imports it, then runs `fedpi train`.
COORDINATOR = f"import sys, {__name__}, fedpi_cli; sys.exit(fedpi_cli.main(sys.argv[1:]))"
TRAIN = ["--dataset", "digits-5k", "--rounds", "2", "--local-batches", "10", "--lr", "0.05", "--seed", "4"]


def _train(cluster, out, rule: str) -> dict[str, torch.Tensor]:
    proc = subprocess.run(
        [sys.executable, "-c", COORDINATOR, "train", "--workers", cluster.spec, *TRAIN, "--aggregation", rule,
         "--output-dir", str(out), "--log-format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = [e for e in events(proc.stdout) if e.get("event") == "round_finished"]
    assert [(e["round"], e["aggregation"]) for e in finished] == [(1, rule), (2, rule)]
    return torch.load(out / "model.pt", weights_only=True)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def test_a_rule_registered_from_a_test_file_trains_a_real_run(digits_cluster, tmp_path):
    plugged = _train(digits_cluster, tmp_path / "plugged", "extremes-dropped")
    built_in = _train(digits_cluster, tmp_path / "built-in", "trimmed-mean:1")
    fedavg = _train(digits_cluster, tmp_path / "fedavg", "fedavg")
    assert _distance(plugged, built_in) < 1e-5
    assert _distance(plugged, fedavg) > 1e-3
