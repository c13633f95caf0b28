"""Round strategies: which workers train, what each is asked to do, how much its update weighs, and whether a round
counts. How the updates are combined is the aggregation rule's business (coordinator_service.engine.robust), and how the
aggregate becomes the next model the server optimizer's (coordinator_service.policy.server_opt)."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from coordinator_service.policy.rules import AggregationRule, weighted_rules
from generated.fedpi.v1 import worker_pb2 as pb

T = TypeVar("T")

LR_SCHEDULES = ("cosine", "exponential", "constant")


@dataclass(frozen=True)
class Failure:
    worker: str
    phase: str  # handshake, set_weights, train, get_weights, evaluate
    reason: str


class Strategy(ABC):
    """A federated averaging policy. The round loop calls these and never decides anything itself."""

    name: ClassVar[str] = ""
    # Whether the strategy's correction lives in the updates' weights, so that a rule ignoring weights undoes it.
    needs_weighted_rule: ClassVar[bool] = False
    # FedDyn's alpha in every TrainRequest while the server optimizer runs FedDyn (auto may turn it on mid-run).
    feddyn_alpha: float = 0.0

    @classmethod
    def check_rule(cls, rule: AggregationRule) -> None:
        """ValueError if `rule` cannot carry out this strategy."""
        if cls.needs_weighted_rule and not rule.uses_weights:
            raise ValueError(
                f"strategy {cls.name} weighs every update by its local steps; aggregation {rule} ignores weights: "
                f"use {' or '.join(weighted_rules())}"
            )

    @abstractmethod
    def configure_train(self, server_round: int, worker_index: int) -> pb.TrainRequest:
        """The Train request for one worker in one round."""

    @abstractmethod
    def weight(self, result: pb.TrainResult) -> float:
        """How much this worker's update counts in the average."""

    def sample(self, server_round: int, workers: Sequence[T], index_of: Callable[[T], int]) -> list[T]:
        """The workers that train this round (default: all of them)."""
        return list(workers)

    def aggregate_scale(self, results: Sequence[pb.TrainResult]) -> float:
        """The global model moves this many times the way to the weighted mean of the updates (default: all the
        way). FedNova moves further, by the mean number of local steps, once every update is normalised per step."""
        return 1.0

    def lr_factor(self, server_round: int) -> float:
        """The workers' learning rate in this round over the first round's (default: 1, a constant rate)."""
        return 1.0

    def max_samples(self, request: pb.TrainRequest, shard_size: int, max_local_batches: int) -> int:
        """The most samples a worker can honestly report for `request` on a shard of `shard_size` (from its
        handshake): batches x batch size, epochs x shard, or its batch limit x batch size for a time budget. A
        report above it is refused, so that no worker can make itself the whole average by claiming samples it
        never trained on."""
        if request.local_batches:
            return request.local_batches * request.batch_size
        if request.local_seconds:
            return max_local_batches * request.batch_size
        return request.local_epochs * shard_size

    @abstractmethod
    def accept(self, results: Sequence[pb.TrainResult], failures: Sequence[Failure]) -> bool:
        """Whether enough workers succeeded for the round's average to replace the global model."""


class FedAvg(Strategy):
    """Federated averaging, weighted by the samples each worker trained on (McMahan et al., "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", 2017).

    - `weighted=False`: every worker counts the same, as the old PySyft example did.
    - `proximal_mu` > 0: the workers train with FedProx's proximal term (Li et al., "Federated Optimization in
      Heterogeneous Networks", 2020).
    - `not_true_distillation` > 0: the workers of a classifier add FedNTD's term (Lee et al., "Preservation of the
      Global Knowledge by Not-True Distillation in Federated Learning", 2022) with this weight.
    - `lr_schedule`: the workers' learning rate over the `rounds` of the run (`learning_rate_of`).
    - `fraction` / `workers_per_round`: each round trains a seeded random sample of the workers present (McMahan et
      al.'s client fraction C), the same sample for the same seed and round.
    - `local_seconds`: each worker trains for a time budget instead of a number of batches (see FedNova, which
      corrects the average for the unequal local work this gives).
    """

    name: ClassVar[str] = "fedavg"

    def __init__(
        self,
        *,
        local_batches: int = 50,
        local_epochs: int = 0,
        local_seconds: float = 0.0,
        batch_size: int = 64,
        learning_rate: float = 0.01,
        momentum: float = 0.0,
        seed: int = 0,
        min_workers: int = 1,
        weighted: bool = True,
        evaluate_locally: bool = False,
        lr_schedule: str = "exponential",
        lr_decay: float = 1.0,
        rounds: int = 1,
        proximal_mu: float = 0.0,
        not_true_distillation: float = 0.0,
        fraction: float = 1.0,
        workers_per_round: int = 0,
        dp_sgd_noise_multiplier: float = 0.0,
        dp_sgd_max_grad_norm: float = 0.0,
        dp_delta: float = 0.0,
        feddyn_alpha: float = 0.0,
    ):
        if not 0 < fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
        if workers_per_round < 0:
            raise ValueError(f"--workers-per-round must not be negative, got {workers_per_round}")
        self.local_batches = 0 if (local_epochs or local_seconds) else local_batches
        self.local_epochs = local_epochs
        self.local_seconds = local_seconds
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.seed = seed
        self.min_workers = min_workers
        self.weighted = weighted
        self.evaluate_locally = evaluate_locally
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.lr_decay = lr_decay
        self.rounds = rounds  # the run's length, which the cosine schedule spans
        self.proximal_mu = proximal_mu  # FedProx (Li et al., 2020) when positive
        self.not_true_distillation = not_true_distillation  # FedNTD's beta (Lee et al., 2022) when positive
        self.fraction = fraction
        self.workers_per_round = workers_per_round
        self.dp_sgd_noise_multiplier = dp_sgd_noise_multiplier  # DP-SGD on every worker when positive
        self.dp_sgd_max_grad_norm = dp_sgd_max_grad_norm
        self.dp_delta = dp_delta
        self.feddyn_alpha = feddyn_alpha  # FedDyn's workers' regulariser (Acar et al., 2021) when positive

    def learning_rate_of(self, server_round: int) -> float:
        """The local learning rate of a round (from 1). Cosine (Loshchilov and Hutter's SGDR, one cycle over the run)
        anneals it from learning_rate towards 0, so the last rounds settle rather than swing; exponential multiplies
        it by lr_decay each round."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        if self.lr_schedule == "cosine":
            done = min(server_round - 1, self.rounds - 1) / self.rounds
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * done))
        return self.learning_rate * self.lr_decay ** (server_round - 1)

    def lr_factor(self, server_round: int) -> float:
        return self.learning_rate_of(server_round) / self.learning_rate

    def configure_train(self, server_round: int, worker_index: int) -> pb.TrainRequest:
        return pb.TrainRequest(
            round=server_round,
            local_batches=self.local_batches,
            local_epochs=self.local_epochs,
            local_seconds=self.local_seconds,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate_of(server_round),
            momentum=self.momentum,
            # Distinct per round and worker, reproducible from --seed.
            seed=self.seed * 1_000_003 + server_round * 1_009 + worker_index,
            evaluate=self.evaluate_locally,
            proximal_mu=self.proximal_mu,
            # The distillation anneals with the rate: it holds the classes a worker lacks while its steps are
            # large enough to forget them, and gives way as the schedule stills them (docs/guide.md).
            not_true_distillation=self.not_true_distillation * self.lr_factor(server_round),
            dp_sgd_noise_multiplier=self.dp_sgd_noise_multiplier,
            dp_sgd_max_grad_norm=self.dp_sgd_max_grad_norm if self.dp_sgd_noise_multiplier else 0.0,
            dp_delta=self.dp_delta if self.dp_sgd_noise_multiplier else 0.0,
            feddyn_alpha=self.feddyn_alpha,
        )

    def sample_size(self, present: int) -> int:
        """How many of `present` workers train in a round."""
        wanted = self.workers_per_round or math.ceil(self.fraction * present)
        return max(1, min(wanted, present))

    def sample(self, server_round: int, workers: Sequence[T], index_of: Callable[[T], int]) -> list[T]:
        k = self.sample_size(len(workers))
        if k >= len(workers):
            return list(workers)
        # Ordered by the workers' stable numbers, so the choice depends on the seed and round, not on who answered
        # the handshake first.
        ordered = sorted(workers, key=index_of)
        chosen = random.Random(self.seed * 1_000_003 + server_round).sample(ordered, k)
        return sorted(chosen, key=index_of)

    def weight(self, result: pb.TrainResult) -> float:
        return float(result.samples) if self.weighted else 1.0

    def accept(self, results: Sequence[pb.TrainResult], failures: Sequence[Failure]) -> bool:
        return len(results) >= self.min_workers


class FedNova(FedAvg):
    """FedAvg normalised for unequal local work (Wang et al., "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020).

    A worker that ran more local steps moved its model further; plain FedAvg lets it pull the average towards its
    own objective. FedNova divides each update (y_i - x) by a_i, the norm of its local step weights, averages these
    per-step updates with weights p_i (samples), and moves the global model tau_eff = sum p_i a_i steps:

        x <- x + tau_eff * sum_i p_i (y_i - x) / a_i

    which equals FedAvg's weighted mean with weights p_i / a_i followed by a step of
    (sum p_i a_i) * (sum p_i / a_i) >= 1 towards it. For SGD with momentum rho, a_i = (tau_i - rho (1 - rho^tau_i)
    / (1 - rho)) / (1 - rho) after tau_i steps (tau_i with plain SGD); with FedProx's proximal term mu at learning
    rate eta, a_i = (1 - (1 - eta mu)^tau_i) / (eta mu).
    """

    name: ClassVar[str] = "fednova"
    needs_weighted_rule: ClassVar[bool] = True  # its normalisation is in the weights

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.momentum and self.proximal_mu:
            raise ValueError(
                "FedNova's normalisation is defined for local SGD with momentum or with FedProx's "
                "proximal term, not both: drop --momentum or --proximal-mu"
            )

    def steps_norm(self, result: pb.TrainResult) -> float:
        """a_i: the L1 norm of the weights local SGD gave its tau_i gradients."""
        tau, rho = max(result.batches, 1), self.momentum
        if self.proximal_mu:
            decay = 1 - self.learning_rate_of(result.round) * self.proximal_mu
            return (1 - decay**tau) / (1 - decay) if decay != 1 else float(tau)
        if rho:
            return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
        return float(tau)

    def _share(self, result: pb.TrainResult) -> float:
        return float(result.samples) if self.weighted else 1.0

    def weight(self, result: pb.TrainResult) -> float:
        return self._share(result) / self.steps_norm(result)

    def aggregate_scale(self, results: Sequence[pb.TrainResult]) -> float:
        total = sum(self._share(r) for r in results)
        if not results or total <= 0:
            return 1.0
        p = [self._share(r) / total for r in results]
        a = [self.steps_norm(r) for r in results]
        return sum(pi * ai for pi, ai in zip(p, a)) * sum(pi / ai for pi, ai in zip(p, a))


STRATEGIES: dict[str, type[FedAvg]] = {cls.name: cls for cls in (FedAvg, FedNova)}
