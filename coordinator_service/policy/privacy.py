"""Differential privacy on the coordinator's side.

Worker-level: DP-FedAvg with fixed or adaptive clipping (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018; Andrew et al. 2021), and its accountant. Each round, every update is pulled back to at most
the clip norm (L2) from the global model, so one worker can change the sum by at most that much; the clipped updates are
summed with equal weights, Gaussian noise of standard deviation noise multiplier x clip norm is added to the sum, and
the sum is divided by the number of workers a round samples (fixed, so that who dropped out changes nothing but the
sum). What a worker's data can reveal through the released models is then bounded by (epsilon, delta), which the
accountant reports after every round: Opacus's Renyi-DP accountant (Mironov 2017; sampled Gaussian mechanism), the
workers of a round counted as sampled with probability workers per round / workers. Without sampling (every worker every
round) epsilon grows fast; the guarantee is meant for fleets that sample a few of many boards.

The noise is drawn from torch's generator, seeded each round from the operating system's CSPRNG: sound against a
coordinator's observers, not against floating-point attacks on the noise itself (Mironov 2012), as Opacus without its
secure mode.

Sample-level (DP-SGD) runs on the workers (worker_service.dp_sgd); the coordinator only foresees its epsilon, so that
no round starts that would take a worker past the budget."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import ClassVar

import structlog
import torch

from coordinator_service.policy.rules import AggregationRule, RoundUpdates

log = structlog.get_logger()


class PrivacyUnavailable(RuntimeError):
    """The accountant's library is not installed."""


@dataclass
class AdaptiveClip:
    """Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021): the
    clip norm follows a quantile of the updates' norms, learnt privately. Each round counts the updates within the
    clip, each as +1/2 and each clipped one as -1/2 (so one worker moves the count by at most 1/2), adds
    N(0, count_stddev^2), and moves the clip geometrically towards leaving `quantile` of them unclipped:
    C <- C exp(-lr (noisy share unclipped - quantile)), the share being noisy count / expected workers + 1/2. The
    count's noise is paid for by a little more noise on the sum, so that both together cost what the run's noise
    multiplier z says (the paper's Theorem 1): z_sum = (z^-2 - (2 count_stddev)^-2)^(-1/2). The clip is state: it is
    checkpointed with the model."""

    norm: float  # this round's clip norm
    quantile: float = 0.5  # the share of updates meant to be left unclipped
    lr: float = 0.2
    count_stddev: float = 1.0

    def sum_noise_multiplier(self, z: float) -> float:
        if not self.count_stddev > z / 2:
            raise ValueError(
                f"adaptive clipping's count noise {self.count_stddev:g} must exceed half the noise multiplier "
                f"({z / 2:g}), or no noise on the sum keeps the total within it"
            )
        return (z**-2 - (2 * self.count_stddev) ** -2) ** -0.5

    def update(self, count: float, expected_workers: int) -> float:
        """Move the clip from the centred count (unclipped - clipped) / 2 that already carries its noise; returns
        the noisy share unclipped."""
        share = count / expected_workers + 0.5
        self.norm *= math.exp(-self.lr * (share - self.quantile))
        return share

    def count_noise(self, generator: torch.Generator) -> float:
        return float(torch.randn((), generator=generator, dtype=torch.float64)) * self.count_stddev


@dataclass(frozen=True)
class GaussianMean(AggregationRule):
    """The DP mean: clip every update to the clip norm, sum with equal weights, add N(0, (z_sum x clip)^2) to every
    floating-point coordinate of the sum, divide by `expected_workers`. With `adaptive`, the clip norm is learnt
    (AdaptiveClip) and z_sum is a little above `noise_multiplier`; without, z_sum = noise_multiplier."""

    name: ClassVar[str] = "dp-fedavg"
    uses_weights: ClassVar[bool] = False  # every worker counts the same: its sensitivity is clip_norm
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    expected_workers: int = 1
    adaptive: AdaptiveClip | None = None
    last: dict = field(default_factory=dict, compare=False)  # the clipping of the last round, for its event

    @property
    def clip(self) -> float:
        """The clip norm of the coming round."""
        return self.adaptive.norm if self.adaptive is not None else self.clip_norm

    @property
    def sum_noise_multiplier(self) -> float:
        if self.adaptive is None:
            return self.noise_multiplier
        return self.adaptive.sum_noise_multiplier(self.noise_multiplier)

    async def combine(self, updates: RoundUpdates) -> list[torch.Tensor]:
        arrived, clip = updates.arrived, self.clip
        for u in [u for u in arrived if u.distance > clip]:
            await updates.add_scaled(u, u.weight * (clip / u.distance - 1))
        flat = await updates.mean()  # sum / len(arrived): the weights are all 1
        std = self.sum_noise_multiplier * clip / self.expected_workers
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        for acc, ref in zip(flat, updates.reference):
            if ref.is_floating_point():
                delta = acc.sub_(ref.to(acc.dtype)).mul_(len(arrived) / self.expected_workers)
                delta.add_(torch.randn(delta.shape, generator=generator, dtype=delta.dtype), alpha=std)
                acc.add_(ref.to(acc.dtype))
        clipped = sum(u.distance > clip for u in arrived)
        count = None
        if self.adaptive is not None:
            count = (len(arrived) - 2 * clipped) / 2 + self.adaptive.count_noise(generator)
        self.clipped(clip, clipped, len(arrived), count)
        return flat

    def clipped(
        self, clip: float, clipped: int | None, workers: int, noisy_count: float | None, noise_std: float | None = None
    ) -> None:
        """Record a round's clipping (`clipped` is None when no one may count it: under secure aggregation, where the
        workers noise their own updates and `noise_std` is what their noise came to) and, with adaptive clipping,
        move the clip from the noisy centred count (AdaptiveClip.update)."""
        std = self.sum_noise_multiplier * clip / self.expected_workers if noise_std is None else noise_std
        self.last.clear()
        self.last.update(clip_norm=float(f"{clip:.6g}"), noise_std=float(f"{std:.4g}"))
        if clipped is not None:
            self.last["clipped"] = clipped
        if self.adaptive is not None and noisy_count is not None:
            share = self.adaptive.update(noisy_count, self.expected_workers)
            self.last.update(unclipped_share=round(share, 4), next_clip_norm=float(f"{self.adaptive.norm:.6g}"))
        log.info("dp_noise_added", workers=workers, **self.last)

    def state_dict(self) -> dict:
        return {"dp_clip_norm": self.adaptive.norm} if self.adaptive is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adaptive is not None and "dp_clip_norm" in state:
            self.adaptive.norm = float(state["dp_clip_norm"])

    def __str__(self) -> str:
        clip = f"adaptive clip, quantile {self.adaptive.quantile:g}" if self.adaptive else f"clip {self.clip_norm:g}"
        return f"{self.name} ({clip}, noise multiplier {self.noise_multiplier:g})"


@dataclass(frozen=True)
class Accountant:
    noise_multiplier: float
    sample_rate: float  # workers per round / workers
    delta: float
    target_epsilon: float = 0.0  # 0: no budget

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` after `rounds` rounds of the sampled Gaussian mechanism."""
        return _rdp_epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def unsampled(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds for one who knows who was sampled (under secure aggregation, the
        coordinator): a worker that took part in every one of them."""
        return _rdp_epsilon(self.noise_multiplier, 1.0, rounds, self.delta)

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
