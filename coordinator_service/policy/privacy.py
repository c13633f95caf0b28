"""Differential privacy on the coordinator's side.

Worker-level: DP-FedAvg with fixed clipping (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018), and its accountant. Each round, every update is pulled back to at most `clip_norm` (L2) from
the global model, so one worker can change the sum by at most that much; the clipped updates are summed with equal
weights, Gaussian noise of standard deviation `noise_multiplier x clip_norm` is added to the sum, and the sum is
divided by the number of workers a round samples (fixed, so that who dropped out changes nothing but the sum). What a
worker's data can reveal through the released models is then bounded by (epsilon, delta), which the accountant
reports after every round: Opacus's Renyi-DP accountant (Mironov 2017; sampled Gaussian mechanism), the workers of a
round counted as sampled with probability workers per round / workers. Without sampling (every worker every round)
epsilon grows fast; the guarantee is meant for fleets that sample a few of many boards.

The noise is drawn from torch's generator, seeded each round from the operating system's CSPRNG: sound against a
coordinator's observers, not against floating-point attacks on the noise itself (Mironov 2012), as Opacus without its
secure mode.

Sample-level (DP-SGD) runs on the workers (worker_service.dp_sgd); the coordinator only foresees its epsilon, so that
no round starts that would take a worker past the budget."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import ClassVar

import structlog
import torch

from coordinator_service.policy.rules import AggregationRule, RoundUpdates

log = structlog.get_logger()


class PrivacyUnavailable(RuntimeError):
    """The accountant's library is not installed."""


@dataclass(frozen=True)
class GaussianMean(AggregationRule):
    """The DP mean: clip every update to `clip_norm`, sum with equal weights, add N(0, (noise_multiplier x
    clip_norm)^2) to every floating-point coordinate of the sum, divide by `expected_workers`."""

    name: ClassVar[str] = "dp-fedavg"
    uses_weights: ClassVar[bool] = False  # every worker counts the same: its sensitivity is clip_norm
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    expected_workers: int = 1

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        arrived = updates.arrived
        for u in [u for u in arrived if u.distance > self.clip_norm]:
            await updates.add_scaled(u, u.weight * (self.clip_norm / u.distance - 1))
        flat = await updates.mean()  # sum / len(arrived): the weights are all 1
        std = self.noise_multiplier * self.clip_norm / self.expected_workers
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        for acc, ref in zip(flat, updates.reference):
            if ref.is_floating_point():
                delta = acc.sub_(ref.to(acc.dtype)).mul_(len(arrived) / self.expected_workers)
                delta.add_(torch.randn(delta.shape, generator=generator, dtype=delta.dtype), alpha=std)
                acc.add_(ref.to(acc.dtype))
        clipped = sum(u.distance > self.clip_norm for u in arrived)
        log.info("dp_noise_added", clipped=clipped, workers=len(arrived), noise_std=round(std, 6))
        return flat

    def __str__(self) -> str:
        return f"{self.name} (clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:g})"


@dataclass(frozen=True)
class Accountant:
    noise_multiplier: float
    sample_rate: float  # workers per round / workers
    delta: float
    target_epsilon: float = 0.0  # 0: no budget

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` after `rounds` rounds of the sampled Gaussian mechanism."""
        return _rdp_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds stay within the budget."""
        return not self.target_epsilon or self.epsilon(rounds) <= self.target_epsilon


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    if steps <= 0:
        return 0.0
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise PrivacyUnavailable(
            "differential privacy needs its accountant: pip install 'fedpi[privacy]' (Opacus)"
        ) from None
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class SampleAccountant:
    """DP-SGD's epsilon on one worker's data, as that worker accounts it (worker_service.dp_sgd), foreseen by the
    coordinator from the worker's shard size so that a round that would pass the budget is never started."""

    noise_multiplier: float
    delta: float
    batch_size: int
    local_batches: int
    local_epochs: int
    target_epsilon: float = 0.0

    def steps(self, shard: int) -> int:
        return self.local_batches or self.local_epochs * -(-shard // self.batch_size)

    def epsilon(self, rounds: int, shard: int) -> float:
        rate = min(1.0, self.batch_size / max(shard, 1))
        return _rdp_epsilon(self.noise_multiplier, rate, rounds * self.steps(shard), self.delta)

    def allows(self, rounds: int, shards: list[int]) -> bool:
        return not self.target_epsilon or all(self.epsilon(rounds, n) <= self.target_epsilon for n in shards)
