"""Server-side optimisers: the round's aggregate becomes a pseudo-gradient for the global model.

With x the global model and a the aggregate of the updates (FedAvg's mean, or a robust rule's result), the round's
pseudo-gradient is d = a - x. Plain FedAvg takes x <- a. The others (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019):

    FedAvgM     m <- beta1 m + d                         x <- x + lr m
    FedAdagrad  m <- beta1 m + (1 - beta1) d,  v <- v + d^2                      x <- x + lr m / (sqrt(v) + tau)
    FedYogi     m as Adagrad,  v <- v - (1 - beta2) d^2 sign(v - d^2)                     (same step)
    FedAdam     m as Adagrad,  v <- beta2 v + (1 - beta2) d^2                             (same step)
    FedDyn      h <- h - alpha d                         x <- a - s h / alpha

FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021) is also the workers': each
adds a linear term and a proximal one to its loss (worker_service.trainer); h, the server's side, corrects the mean
by what the workers' regularisers have drifted it. Here d is the mean over the round's workers, as if every worker
trained (the paper scales it by the share that did). s is the round's learning-rate factor: the workers' rate that
round over the first round's (1 with a constant rate). The correction h / alpha is a step the server takes with the
workers' sum of past gradients, and it anneals with their rate: where the schedule has stilled the workers, a full
correction would go on moving the model each round along gradients that no worker measures any more (measured: the
test loss then rises over the last rounds while the workers barely move; docs/guide.md, Server optimizers).

`auto`, the default, is FedAvg until a round has two or more updates, then FedDyn for the rest of the run if those
updates disagree (update_agreement below AUTO_AGREEMENT) and FedAvg otherwise. Agreeing updates are what IID shards
give, where FedAvg is best; disagreeing ones are what boards with different classes give, where FedDyn's correction
holds the model. The choice is made once, so the run keeps one trajectory, and it is saved with the state.

Only floating-point tensors are optimised; integer buffers (BatchNorm's counters) take the aggregate. The state (m, v)
is one or two model-sized buffers, saved in every checkpoint so that --resume continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SERVER_OPTIMIZERS = ("auto", "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "feddyn")

#: `auto` turns FedDyn on below this agreement: between the lowest IID figure and the highest skewed one that round 1
#: of the reference CNN measures on MNIST and Fashion-MNIST with 3 and 10 workers (0.54 and 0.34; `python -m
#: bench.learning agreement`, docs/guide.md, Server optimizers).
AUTO_AGREEMENT = 0.4


def update_agreement(distances: Sequence[float], weights: Sequence[float], mean_distance: float) -> float | None:
    """How alike a round's updates are: the mean cosine between every two of them, pair i, j weighing w_i w_j d_i d_j
    (1: all point the same way; 0: at right angles; below 0: against each other). From the norms alone: with
    A the weighted mean update, ||A||^2 = sum_i w_i^2 d_i^2 + sum_{i != j} w_i w_j d_i d_j cos_ij, so a streamed sum
    and each update's distance d_i from the global model give it, in O(model) memory. None for fewer than two updates
    that moved."""
    total = sum(weights)
    pairs = [(w / total, d) for w, d in zip(weights, distances) if w > 0 and d > 0] if total > 0 else []
    if len(pairs) < 2:
        return None
    own = sum((w * d) ** 2 for w, d in pairs)
    cross = sum(w * d for w, d in pairs) ** 2 - own
    return max(-1.0, min(1.0, (mean_distance**2 - own) / cross))


@dataclass(frozen=True)
class ServerOptimizerConfig:
    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    alpha: float = 0.1  # FedDyn's


class ServerOptimizer:
    """Turns the aggregate into the next global model, in place; keeps its state across rounds."""

    def __init__(self, config: ServerOptimizerConfig = ServerOptimizerConfig()):
        if config.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {config.name!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
        if not config.lr > 0:
            raise ValueError(f"--server-lr must be positive, got {config.lr}")
        self.config = config
        self.active = "fedavg" if config.name == "auto" else config.name  # what steps: auto's choice once made
        self.agreement: float | None = None  # auto: the agreement it chose by
        self.m: list[torch.Tensor] | None = None  # moments, made on the first step: one per float tensor
        self.v: list[torch.Tensor] = []

    @property
    def chosen(self) -> bool:
        return self.config.name != "auto" or self.agreement is not None

    @property
    def worker_alpha(self) -> float:
        """FedDyn's alpha for the workers' regulariser while FedDyn steps, else 0."""
        return self.config.alpha if self.active == "feddyn" else 0.0

    def choose(self, agreement: float | None, feddyn: bool = True) -> bool:
        """auto: the first measured agreement picks FedDyn (if `feddyn`: every worker can run it) or FedAvg for the
        rest of the run; True when it does."""
        if self.chosen or agreement is None:
            return False
        self.agreement = agreement
        self.active = "feddyn" if agreement < AUTO_AGREEMENT and feddyn else "fedavg"
        return True

    def step(
        self,
        global_model: Sequence[torch.Tensor],
        aggregate: Sequence[torch.Tensor],
        trained: Sequence[bool] | None = None,
        lr_factor: float = 1.0,
    ) -> None:
        """Replace each floating-point tensor of `aggregate` (flat, accumulator dtype) by the next global model.
        `trained` marks the model's parameters among them: FedDyn corrects only those (the workers regularise only
        those; a buffer such as BatchNorm's running variance takes the mean). `lr_factor` is the round's
        learning-rate factor (Strategy.lr_factor), s in FedDyn's correction."""
        c, name = self.config, self.active
        if name == "fedavg":
            return
        if trained is None or name != "feddyn":
            trained = [True] * len(aggregate)
        pairs = [(g, a) for g, a, t in zip(global_model, aggregate, trained) if a.is_floating_point() and t]
        if self.m is None:
            self.m = [torch.zeros_like(a) for _, a in pairs]
            self.v = [torch.full_like(a, c.tau**2) for _, a in pairs] if name not in ("fedavgm", "feddyn") else []
        for i, (g, a) in enumerate(pairs):
            d = a - g.to(a.dtype)
            m = self.m[i]
            if name == "feddyn":
                m.sub_(d, alpha=c.alpha)
                a.sub_(m, alpha=lr_factor / c.alpha)
                continue
            if name == "fedavgm":
                m.mul_(c.beta1).add_(d)
                a.copy_(g.to(a.dtype) + c.lr * m)
                continue
            m.mul_(c.beta1).add_(d, alpha=1 - c.beta1)
            v, d2 = self.v[i], d * d
            if name == "fedadagrad":
                v.add_(d2)
            elif name == "fedyogi":
                v.sub_((1 - c.beta2) * d2 * torch.sign(v - d2))
            else:
                v.mul_(c.beta2).add_(d2, alpha=1 - c.beta2)
            a.copy_(g.to(a.dtype) + c.lr * m / (v.sqrt() + c.tau))

    def state_dict(self) -> dict:
        chosen = {"active": self.active, "agreement": self.agreement} if self.config.name == "auto" else {}
        return {"name": self.config.name, **chosen, "m": self.m or [], "v": self.v or []}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.config.name:
            raise ValueError(
                f"the checkpoint's server optimizer is {state.get('name')!r}, this run's is "
                f"{self.config.name!r}: resume with --server-optimizer {state.get('name')}"
            )
        if self.config.name == "auto":
            self.active, self.agreement = state.get("active", "fedavg"), state.get("agreement")
        self.m = list(state["m"]) or None
        self.v = list(state["v"]) if self.m is not None else []
