"""Local training on this worker's shard. Plain torch, no gRPC: the servicer calls it from a thread."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import cast

import structlog
import torch
from torch import nn
from torch.nn import functional as F

from fedpi.data import Dataset

# Most batches one Train may ask for unless the worker is started with another --max-local-batches: about a day of
# training on a Pi 4 with the reference CNN, and a bound on what a request can make a worker do.
from fedpi.names import DEFAULT_MAX_LOCAL_BATCHES  # noqa: E402,F401 - re-exported
from fedpi.task import StepResult, Task, batch_of
from worker_service.dp_sgd import Ledger, private_steps

MAX_LOCAL_SECONDS = 86_400.0
MAX_DISTILLATION = 100.0  # beta beyond this drowns the task's own loss
log = structlog.get_logger()


class TrainingCancelled(Exception):
    """The caller went away; the round was abandoned half-way (weights are reset by the next SetWeights)."""


@dataclass(frozen=True)
class TrainConfig:
    local_batches: int = 50
    local_epochs: int = 0
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.0
    seed: int = 0
    evaluate: bool = False
    proximal_mu: float = 0.0  # FedProx: the loss gains mu/2 * ||w - w_start||^2
    local_seconds: float = 0.0  # a time budget instead of a number of batches
    not_true_distillation: float = 0.0  # FedNTD's beta: the weight of the not-true distillation term
    dp_sgd_noise_multiplier: float = 0.0  # DP-SGD when positive (worker_service.dp_sgd)
    dp_sgd_max_grad_norm: float = 0.0
    dp_delta: float = 0.0
    round_id: str = ""  # RUN/ROUND.ATTEMPT: DP-SGD accounts per run, FedDyn keeps its linear term per run
    feddyn_alpha: float = 0.0  # FedDyn: the loss gains -<g, w> + alpha/2 * ||w - w_start||^2

    @property
    def run(self) -> str:
        """The run this round belongs to (RUN of RUN/ROUND.ATTEMPT)."""
        return self.round_id.split("/")[0]

    def _validate_dp_sgd(self) -> None:
        if not 0 < self.dp_sgd_noise_multiplier <= 100:
            raise ValueError(f"dp_sgd_noise_multiplier must be in (0, 100], got {self.dp_sgd_noise_multiplier}")
        if not 0 < self.dp_sgd_max_grad_norm < 1e6:
            raise ValueError(f"DP-SGD needs dp_sgd_max_grad_norm in (0, 1e6), got {self.dp_sgd_max_grad_norm}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"DP-SGD needs dp_delta in (0, 1), got {self.dp_delta}")
        if self.local_seconds or self.proximal_mu or self.feddyn_alpha:
            raise ValueError("DP-SGD goes with local_batches or local_epochs, without proximal_mu or feddyn_alpha")

    @property
    def private(self) -> bool:
        return self.dp_sgd_noise_multiplier > 0

    @classmethod
    def from_request(cls, request: object) -> TrainConfig:
        """The config a TrainRequest asks for: its fields of the same names (a new field is read once it is here)."""
        return cls(**{f.name: getattr(request, f.name) for f in fields(cls)})

    def total_batches(self, train_samples: int, max_batches: int = DEFAULT_MAX_LOCAL_BATCHES) -> int:
        """How many batches this request trains on a shard of `train_samples` (with a time budget: at most)."""
        if self.local_seconds:
            return max_batches
        return self.local_batches or self.local_epochs * -(-train_samples // self.batch_size)

    def validate(self, train_samples: int, max_batches: int = DEFAULT_MAX_LOCAL_BATCHES) -> None:
        if not 0 <= self.local_seconds <= MAX_LOCAL_SECONDS:  # NaN too
            raise ValueError(
                f"local_seconds must be between 0 and {MAX_LOCAL_SECONDS:.0f} (a day), got {self.local_seconds}"
            )
        if sum(x > 0 for x in (self.local_batches, self.local_epochs, self.local_seconds)) != 1:
            raise ValueError("set exactly one of local_batches, local_epochs and local_seconds to a positive number")
        if self.local_batches < 0 or self.local_epochs < 0:
            raise ValueError("local_batches and local_epochs must not be negative")
        if not 1 <= self.batch_size <= 65536:
            raise ValueError(f"batch_size must be between 1 and 65536, got {self.batch_size}")
        if not 0 < self.learning_rate < 100:
            raise ValueError(f"learning_rate must be positive (and sane), got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.proximal_mu < 1e6:
            raise ValueError(f"proximal_mu must be in [0, 1e6), got {self.proximal_mu}")
        if not 0 <= self.feddyn_alpha <= 10:
            raise ValueError(f"feddyn_alpha must be in [0, 10], got {self.feddyn_alpha}")
        if self.feddyn_alpha and self.proximal_mu:
            raise ValueError("feddyn_alpha and proximal_mu exclude each other: FedDyn's term has its own proximal part")
        if not 0 <= self.not_true_distillation <= MAX_DISTILLATION:
            raise ValueError(
                f"not_true_distillation must be in [0, {MAX_DISTILLATION:g}], got {self.not_true_distillation}"
            )
        if self.dp_sgd_noise_multiplier:
            self._validate_dp_sgd()
        if train_samples == 0:
            raise ValueError("this worker's shard holds no training samples")
        if not self.local_seconds and self.total_batches(train_samples) > max_batches:
            raise ValueError(
                f"the request asks for {self.total_batches(train_samples)} batches, more than this worker's limit of "
                f"{max_batches} (GetInfo max_local_batches; the worker's --max-local-batches)"
            )


@dataclass(frozen=True)
class TrainOutcome:
    samples: int
    batches: int
    mean_loss: float
    accuracy: float
    train_seconds: float
    test_loss: float = 0.0
    test_accuracy: float = 0.0
    test_samples: int = 0
    dp_epsilon: float | None = None  # with DP-SGD: this run's epsilon on this worker's data so far

    def summary(self) -> dict[str, float]:
        """What a log line says of it."""
        return {
            "samples": self.samples,
            "loss": round(self.mean_loss, 4),
            "accuracy": round(self.accuracy, 4),
            "seconds": round(self.train_seconds, 3),
        }


Progress = Callable[[int, int, float, float], None]  # batches_done, batches_total, mean_loss, seconds


def not_true_kl(scores: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """FedNTD's term (Lee et al., "Preservation of the Global Knowledge by Not-True Distillation in Federated
    Learning", 2022), temperature 1: the mean over the batch of KL(teacher || model) between the softmax of the two
    score rows with each sample's own class left out. Scores may be logits or log-probabilities (a softmax does not
    see a shift of its row)."""
    n, classes = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.arange(n), labels] = False
    student = F.log_softmax(scores[keep].view(n, classes - 1), dim=1)
    target = F.log_softmax(teacher[keep].view(n, classes - 1), dim=1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def _class_scores(step: StepResult) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The step's class scores and labels if it gives what the term needs: a row of at least 3 scores per sample
    (with 2 the other classes are one, and the term is 0) and one integer label per sample."""
    scores, labels = step.scores, step.labels
    if scores is None or labels is None or scores.dim() != 2 or scores.shape[1] < 3:
        return None
    if labels.shape != (scores.shape[0],) or labels.is_floating_point() or labels.is_complex():
        return None
    return scores, labels


def _feddyn_gradient(model: nn.Module, anchor: list[torch.Tensor], linear: list[torch.Tensor], alpha: float) -> None:
    """FedDyn's regulariser -<g, w> + alpha/2 ||w - w_start||^2 (Acar et al., "Federated Learning Based on Dynamic
    Regularization", ICLR 2021), added to the gradients directly: alpha (w - w_start) - g."""
    with torch.no_grad():
        for p, a, g in zip(model.parameters(), anchor, linear):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=alpha).sub_(g)


def _proximal(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's term mu/2 * ||w - w_start||^2 (Li et al., "Federated Optimization in Heterogeneous Networks", 2020)."""
    return cast(torch.Tensor, mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor)))


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        batch_delay: float = 0.0,
        max_batches: int = DEFAULT_MAX_LOCAL_BATCHES,
        task: Task | None = None,
    ):
        self.model = model
        self.data = data
        self.task = task or _default_task()  # the loss of a batch and how a model is scored
        self.batch_delay = batch_delay  # seconds of extra wall time per batch: imitates a slower device
        self.max_batches = max_batches
        self._momentum: dict[str, torch.Tensor] = {}  # by parameter name: SGD's buffers, kept for the next round
        self._teacher: nn.Module | None = None  # the installed weights, frozen, while not-true distillation is on
        self._feddyn: tuple[str, list[torch.Tensor]] | None = None  # FedDyn's linear term g, and the run it is for
        self._warned_no_scores = False
        self.ledger = Ledger()  # DP-SGD's accountants, per run
        # The first optimizer ever created imports torch's compiler stack (about 2 s): pay that at start-up,
        # before the worker reports SERVING, not inside round 1.
        torch.optim.SGD(model.parameters(), lr=0.01)

    def batch_order(self, cfg: TrainConfig) -> Iterator[torch.Tensor]:
        """The index batches of this round, made one epoch at a time: a seeded shuffle, cycled when more batches
        are asked than one epoch holds. Never more than one epoch's indices exist at once."""
        n = len(self.data.train)
        gen = torch.Generator().manual_seed(cfg.seed)
        left = cfg.total_batches(n, self.max_batches)
        while left > 0:
            for index in torch.randperm(n, generator=gen).split(cfg.batch_size)[:left]:
                left -= 1
                yield index

    def train(
        self, cfg: TrainConfig, progress: Progress, cancelled: threading.Event, progress_every: float = 2.0
    ) -> TrainOutcome:
        # A task's own randomness (dropout, augmentation) draws from the round's seed, as the batch order does: the
        # same round trains the same way twice. The process's generator is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return self._train(cfg, progress, cancelled, progress_every)

    def _train(
        self, cfg: TrainConfig, progress: Progress, cancelled: threading.Event, progress_every: float
    ) -> TrainOutcome:
        cfg.validate(len(self.data.train), self.max_batches)
        total = cfg.total_batches(len(self.data.train), self.max_batches)
        # With a time budget the number of batches is not known in advance: progress reports 0 as the total.
        shown_total = 0 if cfg.local_seconds else total
        # A fresh optimizer each round, as the reference does: no stale momentum across rounds.
        sgd = torch.optim.SGD(self.model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
        self._start_momentum_at_zero(sgd, cfg.momentum)
        optimizer: torch.optim.Optimizer = sgd
        # FedProx keeps the weights it started from (the global model); plain FedAvg needs no copy. Both, and the
        # distillation teacher, are taken before DP-SGD's hooks are on the model.
        anchor = [p.detach().clone() for p in self.model.parameters()] if cfg.proximal_mu or cfg.feddyn_alpha else None
        linear = self._feddyn_term(cfg) if cfg.feddyn_alpha else None
        teacher = self._frozen_copy() if cfg.not_true_distillation else None
        with contextlib.ExitStack() as private:
            if cfg.private:
                optimizer = private.enter_context(
                    private_steps(
                        self.model, optimizer, cfg.dp_sgd_noise_multiplier, cfg.dp_sgd_max_grad_norm, cfg.batch_size
                    )  # fmt: skip
                )
            outcome = self._steps(
                cfg, optimizer, anchor, teacher, linear, shown_total, progress, cancelled, progress_every
            )
        if linear is not None and anchor is not None:  # g <- g - alpha (w_end - w_start)
            with torch.no_grad():
                for g, p, a in zip(linear, self.model.parameters(), anchor):
                    g.sub_(p.detach() - a, alpha=cfg.feddyn_alpha)
        if cfg.private:
            rate = min(1.0, cfg.batch_size / len(self.data.train))
            epsilon = self.ledger.spend(cfg.run, cfg.dp_sgd_noise_multiplier, rate, outcome.batches, cfg.dp_delta)
            outcome = dataclasses.replace(outcome, dp_epsilon=epsilon)
        if cfg.evaluate and len(self.data.test):
            loss, acc = self.task.evaluate(self.model, self.data.test)
            outcome = dataclasses.replace(outcome, test_loss=loss, test_accuracy=acc, test_samples=len(self.data.test))
        return outcome

    def _steps(
        self,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        anchor: list[torch.Tensor] | None,
        teacher: nn.Module | None,
        linear: list[torch.Tensor] | None,
        shown_total: int,
        progress: Progress,
        cancelled: threading.Event,
        progress_every: float,
    ) -> TrainOutcome:
        """The round's batches: each one's objective, backward and step, with progress reports."""
        total = cfg.total_batches(len(self.data.train), self.max_batches)
        self.model.train()
        loss_sum, correct, samples, batches = 0.0, 0, 0, 0
        start = last_report = time.perf_counter()
        for batches, index in enumerate(self.batch_order(cfg), 1):
            if cancelled.is_set():
                raise TrainingCancelled("training cancelled by the caller")
            optimizer.zero_grad(set_to_none=True)
            step = self.task.train_step(self.model, batch_of(self.data.train, index))
            self._objective(step, cfg, anchor, teacher).backward()
            if linear is not None and anchor is not None:
                _feddyn_gradient(self.model, anchor, linear, cfg.feddyn_alpha)
            optimizer.step()
            if self.batch_delay and cancelled.wait(self.batch_delay):
                raise TrainingCancelled("training cancelled by the caller")
            loss_sum += step.loss.item() * step.samples
            correct += step.correct
            samples += step.samples
            now = time.perf_counter()
            out_of_time = bool(cfg.local_seconds) and now - start >= cfg.local_seconds
            if now - last_report >= progress_every or batches == total or out_of_time:
                progress(batches, shown_total, loss_sum / samples, now - start)
                last_report = now
            if out_of_time:
                break
        return TrainOutcome(samples, batches, loss_sum / samples, correct / samples, time.perf_counter() - start)

    def _objective(
        self, step: StepResult, cfg: TrainConfig, anchor: list[torch.Tensor] | None, teacher: nn.Module | None
    ) -> torch.Tensor:
        """The batch's loss plus the terms the round asks for: FedProx's, not-true distillation's."""
        objective = step.loss
        if anchor and cfg.proximal_mu:
            objective = objective + _proximal(self.model, anchor, cfg.proximal_mu)
        if teacher is not None:
            classes = _class_scores(step)
            if classes is None:
                self._warn_no_scores()
                return objective
            with torch.no_grad():
                targets = teacher(step.inputs)
            objective = objective + cfg.not_true_distillation * not_true_kl(classes[0], targets, classes[1])
        return objective

    def _feddyn_term(self, cfg: TrainConfig) -> list[torch.Tensor]:
        """FedDyn's linear term for this run: zero at its first round here (a restarted worker starts it again)."""
        if self._feddyn is None or self._feddyn[0] != cfg.run:
            self._feddyn = (cfg.run, [torch.zeros_like(p, memory_format=torch.contiguous_format)
                                  for p in self.model.parameters()])  # fmt: skip
        return self._feddyn[1]

    def _frozen_copy(self) -> nn.Module:
        """The weights as installed, frozen: not-true distillation's teacher. One module, refilled every round."""
        if self._teacher is None:
            self._teacher = copy.deepcopy(self.model).requires_grad_(False)
        else:
            self._teacher.load_state_dict(self.model.state_dict())
        return self._teacher.eval()

    def _warn_no_scores(self) -> None:
        if not self._warned_no_scores:
            self._warned_no_scores = True
            log.warning(
                "not_true_distillation_skipped",
                task=self.task.describe(),
                reason="the task's train_step gives no scores of 3 or more classes with integer labels "
                "(StepResult.scores, labels)",
            )

    def _start_momentum_at_zero(self, optimizer: torch.optim.SGD, momentum: float) -> None:
        """The fresh optimizer's momentum, in last round's buffers, zeroed. SGD (dampening 0) makes a missing buffer
        a copy of the first gradient and a zero one momentum x 0 + gradient: the same values, without a model-sized
        buffer allocated, and page-faulted in, every round."""
        if not momentum:
            return
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            buf = self._momentum.get(name)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = self._momentum[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            else:
                buf.zero_()
            optimizer.state[p]["momentum_buffer"] = buf

    def evaluate(self) -> tuple[float, float, int]:
        """Loss and accuracy of the current weights on the local test split, and its size."""
        if not len(self.data.test):
            return 0.0, 0.0, 0
        loss, accuracy = self.task.evaluate(self.model, self.data.test)
        return loss, accuracy, len(self.data.test)


def _default_task() -> Task:
    from fedpi.mnist_task import MnistTask

    return MnistTask()
