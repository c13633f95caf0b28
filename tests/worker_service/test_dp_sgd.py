"""DP-SGD on the worker: per-sample clipping and the noise's measured deviation against the configuration, the
model plain again after a private round, and the worker's accountant against Opacus's figure computed here."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fedpi.data import load_dataset
from fedpi.models import build_model
from fedpi.task import StepResult
from worker_service.trainer import TrainConfig, Trainer

PRIVATE = {"dp_sgd_noise_multiplier": 2.0, "dp_sgd_max_grad_norm": 0.5, "dp_delta": 1e-5}


class NoSignal:
    """A task whose loss has no gradient: a private step then moves the weights by its noise alone."""

    def train_step(self, model: nn.Module, batch) -> StepResult:
        x, y = batch
        out = model(x)
        return StepResult(loss=out.sum() * 0.0, correct=0, samples=len(y))

    def describe(self) -> str:
        return "no-signal"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits-5k", "unused", download=False)


def _cfg(**kw) -> TrainConfig:
    base = TrainConfig(local_batches=1, batch_size=32, learning_rate=0.1, momentum=0.0, round_id="run-a/1.1")
    return TrainConfig(**{**base.__dict__, **kw})


def test_a_private_step_adds_noise_of_sigma_times_the_clip_norm_over_the_batch(digits):
    model = build_model("reference-cnn")  # about 431,000 weights
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, digits, task=NoSignal())  # type: ignore[arg-type]
    trainer.train(_cfg(**PRIVATE), lambda *a: None, threading.Event())
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    # lr x sigma x C / batch: the step divides the noised sum by the batch size
    assert moved.std().item() == pytest.approx(0.1 * 2.0 * 0.5 / 32, rel=0.02)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # plain again


def test_every_sample_s_gradient_is_clipped_before_the_sum(digits):
    """No noise, clip norm tiny: the step is at most lr x C (the mean of gradients each of norm <= C)."""
    model = build_model("reference-cnn")
    before = [p.detach().clone() for p in model.parameters()]
    cfg = _cfg(dp_sgd_noise_multiplier=1e-9, dp_sgd_max_grad_norm=1e-3, dp_delta=1e-5)
    Trainer(model, digits).train(cfg, lambda *a: None, threading.Event())
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    assert 0 < step <= 0.1 * 1e-3 * 1.001
    plain = build_model("reference-cnn")
    Trainer(plain, digits).train(_cfg(), lambda *a: None, threading.Event())
    assert (
        torch.cat([(p.detach() - b).flatten() for p, b in zip(plain.parameters(), before)]).norm().item() > 100 * step
    )


def test_the_worker_accounts_every_round_of_a_run_as_opacus_does(digits):
    from opacus.accountants import RDPAccountant

    trainer = Trainer(build_model("reference-cnn"), digits)
    reference = RDPAccountant()
    rate = 32 / len(digits.train)
    for round_ in (1, 2, 3):
        out = trainer.train(_cfg(local_batches=4, round_id=f"run-a/{round_}.1", **PRIVATE), lambda *a: None,
                            threading.Event())  # fmt: skip
        reference.step(noise_multiplier=2.0, sample_rate=rate)  # four steps a round
        for _ in range(3):
            reference.step(noise_multiplier=2.0, sample_rate=rate)
        assert out.dp_epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    other = trainer.train(_cfg(local_batches=4, round_id="run-b/1.1", **PRIVATE), lambda *a: None, threading.Event())
    assert other.dp_epsilon < out.dp_epsilon  # another run starts from nothing
    assert trainer.train(_cfg(round_id="run-a/4.1"), lambda *a: None, threading.Event()).dp_epsilon is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dp_sgd_max_grad_norm": 0.0}, "dp_sgd_max_grad_norm"),
        ({"dp_delta": 0.0}, "dp_delta"),
        ({"proximal_mu": 0.1}, "without proximal_mu"),
    ],
)
def test_a_private_request_without_what_dp_sgd_needs_is_refused(digits, change, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**{**PRIVATE, **change}).validate(len(digits.train))
