"""Not-true distillation (FedNTD) on the worker, against its formula computed whole."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from structlog.testing import capture_logs
from torch.nn import functional as F

from fedpi.data import load_dataset, shard
from fedpi.mnist_task import MnistTask
from fedpi.models import build_model
from fedpi.task import StepResult, batch_of
from worker_service.trainer import TrainConfig, Trainer, not_true_kl

BETA = 2.0


def _by_hand(scores: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> float:
    """KL(teacher || model) of the softmax over each sample's other classes, one term at a time."""
    total = 0.0
    for s, t, y in zip(scores.tolist(), teacher.tolist(), labels.tolist()):
        others = [c for c in range(len(s)) if c != y]
        zs, zt = sum(math.exp(s[c]) for c in others), sum(math.exp(t[c]) for c in others)
        total += sum(math.exp(t[c]) / zt * math.log((math.exp(t[c]) / zt) / (math.exp(s[c]) / zs)) for c in others)
    return total / len(labels)


def _whole(scores: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same term written another way: the own class masked out of both softmaxes."""
    own = F.one_hot(labels, scores.shape[1]).bool()
    log_s = F.log_softmax(scores.masked_fill(own, -math.inf), dim=1)
    log_t = F.log_softmax(teacher.masked_fill(own, -math.inf), dim=1)
    return (log_t.exp() * (log_t - log_s)).masked_fill(own, 0.0).sum(1).mean()


def test_the_term_is_the_kl_over_the_classes_other_than_each_label():
    g = torch.Generator().manual_seed(0)
    scores, teacher = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    term = not_true_kl(scores, teacher, labels).item()
    assert term == pytest.approx(_by_hand(scores, teacher, labels), rel=1e-12)
    assert _whole(scores, teacher, labels).item() == pytest.approx(term, rel=1e-12)
    # The sample's own class is left out: moving its score changes nothing; a row shift is not seen either.
    moved = scores.clone()
    moved[torch.arange(6), labels] += 10.0
    assert not_true_kl(moved - 7.0, teacher, labels).item() == pytest.approx(term, rel=1e-12)
    assert not_true_kl(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-15)


@pytest.fixture(scope="module")
def cluster_data():
    full = load_dataset("digits-5k", "unused", download=False)
    return [shard(full, i, 2, "labels", 0) for i in range(2)]  # digits 0-4 and 5-9: nothing in common


def _sgd_by_hand(model, data, cfg: TrainConfig) -> None:
    """One worker's round written out: SGD with momentum on nll + beta x the term, the round's start as teacher."""
    teacher = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    for index in Trainer(copy.deepcopy(model), data).batch_order(cfg):
        x, y = batch_of(data.train, index)
        optimizer.zero_grad()
        out = model(x)
        with torch.no_grad():
            target = teacher(x)
        (F.nll_loss(out, y) + cfg.not_true_distillation * _whole(out, target, y)).backward()
        optimizer.step()


def _fedavg(models, weights) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum(m.state_dict()[k] * w for m, w in zip(models, weights)) / total for k in models[0].state_dict()}


def test_two_rounds_of_a_fake_cluster_equal_the_formula_computed_whole(cluster_data):
    """Two workers holding different digits train two rounds; the weights each installs in round 2 are the FedAvg of
    round 1 (so the teacher must be refilled), and every model equals SGD on the formula to float tolerance."""
    workers = [Trainer(build_model("reference-cnn"), d) for d in cluster_data]
    by_hand = [build_model("reference-cnn") for _ in cluster_data]
    for rnd in (1, 2):
        for i, (trainer, reference, data) in enumerate(zip(workers, by_hand, cluster_data)):
            cfg = TrainConfig(local_batches=3, learning_rate=0.05, momentum=0.9, seed=rnd * 10 + i)
            cfg = TrainConfig(**{**cfg.__dict__, "not_true_distillation": BETA})
            out = trainer.train(cfg, lambda *p: None, threading.Event())
            _sgd_by_hand(reference, data, cfg)
            assert out.samples == 3 * 64
            for a, b in zip(trainer.model.parameters(), reference.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        merged = _fedavg([t.model for t in workers], [3 * 64] * 2)
        for trainer, reference in zip(workers, by_hand):
            trainer.model.load_state_dict(merged)
            reference.load_state_dict(merged)


def test_the_term_changes_the_round_and_zero_turns_it_off(cluster_data):
    """With beta 0 no teacher exists (no second model in memory) and the round is plain SGD; with beta > 0 the
    weights differ from it."""
    cfg = TrainConfig(local_batches=3, learning_rate=0.05, momentum=0.9, seed=1)
    plain, distilled = (Trainer(build_model("reference-cnn"), cluster_data[0]) for _ in range(2))
    plain.train(cfg, lambda *p: None, threading.Event())
    distilled.train(TrainConfig(**{**cfg.__dict__, "not_true_distillation": BETA}), lambda *p: None, threading.Event())
    assert plain._teacher is None and distilled._teacher is not None
    reference = build_model("reference-cnn")
    _sgd_by_hand(reference, cluster_data[0], cfg)  # beta 0 in cfg: nll alone
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), reference.parameters()))
    moved = sum(
        float((a - b).detach().abs().max()) for a, b in zip(plain.model.parameters(), distilled.model.parameters())
    )
    assert moved > 1e-4


class NoScores(MnistTask):
    """A task whose train_step says nothing about classes: distillation cannot apply."""

    def train_step(self, model, batch):
        step = super().train_step(model, batch)
        return StepResult(step.loss, step.correct, step.samples)


class FloatTargets(MnistTask):
    """Scores with targets that are not class indices (as a regression's would be)."""

    def train_step(self, model, batch):
        step = super().train_step(model, batch)
        return step._replace(labels=step.labels.float())


@pytest.mark.parametrize("task", [NoScores, FloatTargets])
def test_a_task_without_class_scores_trains_plainly_and_says_so_once(cluster_data, task):
    cfg = TrainConfig(local_batches=3, learning_rate=0.05, momentum=0.9, seed=1)
    plain = Trainer(build_model("reference-cnn"), cluster_data[0])
    plain.train(cfg, lambda *p: None, threading.Event())
    trainer = Trainer(build_model("reference-cnn"), cluster_data[0], task=task())
    with capture_logs() as logs:
        for _ in range(2):
            trainer.model.load_state_dict(build_model("reference-cnn").state_dict())
            trainer.train(
                TrainConfig(**{**cfg.__dict__, "not_true_distillation": BETA}), lambda *p: None, threading.Event()
            )
    assert [e["event"] for e in logs] == ["not_true_distillation_skipped"]
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), trainer.model.parameters()))


@pytest.mark.parametrize("beta", [-1.0, float("nan"), 101.0])
def test_a_bad_beta_is_refused(beta):
    with pytest.raises(ValueError, match="not_true_distillation"):
        TrainConfig(not_true_distillation=beta).validate(100)
