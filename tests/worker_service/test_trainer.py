"""Local training, without any gRPC."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from fedpi.data import load_dataset, shard
from fedpi.models import build_model, evaluate
from fedpi.task import batch_of
from worker_service.trainer import TrainConfig, Trainer, TrainingCancelled


@pytest.fixture(scope="module")
def data():
    return shard(load_dataset("digits-5k", "unused", download=False), 0, 2, "iid", 0)


def test_training_improves_the_model_and_reports_progress(data):
    # Prepare
    model = build_model("reference-cnn")
    before, _ = evaluate(model, data.test)
    progress = []
    # Execute
    out = Trainer(model, data).train(
        TrainConfig(local_batches=30, learning_rate=0.05, momentum=0.5),
        lambda *p: progress.append(p),
        threading.Event(),
        progress_every=0.0,
    )
    # Assert
    after, _ = evaluate(model, data.test)
    assert after < before
    assert out.samples == 30 * 64 and out.batches == 30 and out.train_seconds > 0
    assert progress[-1][:2] == (30, 30)


def test_same_seed_same_result(data):
    results = []
    for _ in range(2):
        model = build_model("reference-cnn")
        results.append(
            Trainer(model, data)
            .train(TrainConfig(local_batches=3, seed=7), lambda *p: None, threading.Event())
            .mean_loss
        )
    assert results[0] == results[1]


def test_epochs_cover_the_shard_once_per_epoch(data):
    out = Trainer(build_model("reference-cnn"), data).train(
        TrainConfig(local_batches=0, local_epochs=1, batch_size=500), lambda *p: None, threading.Event()
    )
    assert out.samples == len(data.train)


def test_cancel_stops_training(data):
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(TrainingCancelled):
        Trainer(build_model("reference-cnn"), data).train(TrainConfig(local_batches=5), lambda *p: None, cancelled)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (TrainConfig(local_batches=0, local_epochs=0), "exactly one"),
        (TrainConfig(local_batches=5, local_epochs=1), "exactly one"),
        (TrainConfig(batch_size=0), "batch_size"),
        (TrainConfig(learning_rate=0), "learning_rate"),
        (TrainConfig(momentum=1.5), "momentum"),
    ],
)
def test_bad_config_is_refused_with_a_reason(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate(100)


def _distance_moved(data, mu: float) -> float:
    model = build_model("reference-cnn")
    start = [p.detach().clone() for p in model.parameters()]
    Trainer(model, data).train(
        TrainConfig(local_batches=10, learning_rate=0.1, proximal_mu=mu), lambda *p: None, threading.Event()
    )
    return sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start)) ** 0.5


def test_fedprox_keeps_the_weights_nearer_where_they_started(data):
    free, held = _distance_moved(data, 0.0), _distance_moved(data, 5.0)
    assert held < 0.7 * free, (held, free)


def test_fedprox_mu_must_be_sane():
    with pytest.raises(ValueError, match="proximal_mu"):
        TrainConfig(proximal_mu=-1).validate(100)
    with pytest.raises(ValueError, match="proximal_mu"):
        TrainConfig(proximal_mu=float("nan")).validate(100)


def test_a_time_budget_trains_until_it_is_spent(data):
    progress = []
    out = Trainer(build_model("reference-cnn"), data, batch_delay=0.05).train(
        TrainConfig(local_batches=0, local_seconds=0.6, batch_size=16),
        lambda *p: progress.append(p),
        threading.Event(),
        progress_every=0.0,
    )
    # 0.05 s of delay per batch plus the batch itself: fewer than 12 batches fit in 0.6 s, and more than one.
    assert 2 <= out.batches < 12 and out.samples == out.batches * 16
    assert 0.6 <= out.train_seconds < 1.5
    assert progress[-1][:2] == (out.batches, 0)  # the total is not known in advance


def test_a_time_budget_stops_at_the_batch_limit(data):
    out = Trainer(build_model("reference-cnn"), data, max_batches=3).train(
        TrainConfig(local_batches=0, local_seconds=60, batch_size=16), lambda *p: None, threading.Event()
    )
    assert out.batches == 3


@pytest.mark.parametrize(
    "cfg, message",
    [
        (TrainConfig(local_batches=5, local_seconds=1.0), "exactly one"),
        (TrainConfig(local_batches=0, local_seconds=-1.0), "between 0 and"),
        (TrainConfig(local_batches=0, local_seconds=1e9), "a day"),
        (TrainConfig(local_batches=5, local_seconds=float("nan")), "between 0 and"),
    ],
)
def test_bad_time_budgets_are_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate(1000)


def test_evaluate_measures_the_installed_weights_on_the_local_test_split(data):
    model = build_model("reference-cnn", seed=4)
    loss, accuracy, samples = Trainer(model, data).evaluate()
    assert (loss, accuracy) == evaluate(model, data.test) and samples == len(data.test)


def test_momentum_kept_between_rounds_trains_exactly_as_a_fresh_optimizer(data):
    """Each round starts with no momentum, as a fresh SGD does; its buffers are reused, not allocated again."""
    cfg = TrainConfig(local_batches=4, learning_rate=0.05, momentum=0.9, seed=3)
    model = build_model("reference-cnn")
    reference = copy.deepcopy(model)
    trainer = Trainer(model, data)
    buffers = []
    for round_seed in (3, 4, 5):
        trainer.train(TrainConfig(**{**cfg.__dict__, "seed": round_seed}), lambda *p: None, threading.Event())
        buffers.append({n: b.data_ptr() for n, b in trainer._momentum.items()})
        optimizer = torch.optim.SGD(reference.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
        reference.train()
        for index in Trainer(reference, data).batch_order(TrainConfig(**{**cfg.__dict__, "seed": round_seed})):
            optimizer.zero_grad(set_to_none=True)
            trainer.task.train_step(reference, batch_of(data.train, index)).loss.backward()
            optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert len(buffers[0]) == len(list(model.parameters())) and buffers[0] == buffers[1] == buffers[2]


def _one_batch(trainer: Trainer, start: dict, round_id: str, alpha: float) -> dict[str, torch.Tensor]:
    trainer.model.load_state_dict(start)
    cfg = TrainConfig(local_batches=1, learning_rate=0.1, seed=3, round_id=round_id, feddyn_alpha=alpha)
    trainer.train(cfg, lambda *p: None, threading.Event())
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_feddyn_keeps_a_linear_term_per_run_as_its_formula_says(data):
    """One batch a round from the same weights w0 and batch, lr 0.1, alpha 0.5. Round 1 is a plain step w1 (g = 0,
    and w = w_start at the only step); then g = -alpha (w1 - w0), so round 2 of the same run steps by
    (1 - alpha lr) (w1 - w0); another run starts g at zero again."""
    model = build_model("reference-cnn")
    w0 = copy.deepcopy(model.state_dict())
    plain = _one_batch(Trainer(copy.deepcopy(model), data), w0, "plain/1.1", 0.0)
    trainer = Trainer(model, data)
    first = _one_batch(trainer, w0, "run/1.1", 0.5)
    second = _one_batch(trainer, w0, "run/2.1", 0.5)
    other = _one_batch(trainer, w0, "another/1.1", 0.5)
    for k in w0:
        torch.testing.assert_close(first[k], plain[k])
        torch.testing.assert_close(second[k] - w0[k], (1 - 0.5 * 0.1) * (plain[k] - w0[k]), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(other[k], plain[k])
    assert any(not torch.equal(second[k], plain[k]) for k in w0)


def test_feddyn_s_gradient_is_the_loss_s_plus_alpha_times_the_distance_minus_the_linear_term():
    from worker_service.trainer import _feddyn_gradient

    model = torch.nn.Linear(3, 2)
    anchor = [p.detach().clone() - 0.5 for p in model.parameters()]
    linear = [torch.full_like(p, 0.25) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    _feddyn_gradient(model, anchor, linear, 0.2)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 1 + 0.2 * 0.5 - 0.25))


def test_feddyn_alpha_must_be_sane_and_alone():
    with pytest.raises(ValueError, match="feddyn_alpha must be in"):
        TrainConfig(feddyn_alpha=-1).validate(100)
    with pytest.raises(ValueError, match="feddyn_alpha must be in"):
        TrainConfig(feddyn_alpha=float("nan")).validate(100)
    with pytest.raises(ValueError, match="feddyn_alpha"):
        TrainConfig(feddyn_alpha=0.1, dp_sgd_noise_multiplier=1.0, dp_sgd_max_grad_norm=1.0, dp_delta=1e-5).validate(
            100
        )
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(feddyn_alpha=0.1, proximal_mu=0.1).validate(100)
