"""Strategies: FedNova's normalised average computed whole and compared with the round loop's streamed result,
seeded worker sampling, and features refused to workers too old to honour them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from coordinator_service.engine.rounds import RoundRunner, TransferSettings
from coordinator_service.policy.strategy import FedAvg, FedNova
from generated.fedpi.v1 import worker_pb2 as pb
from tests.coordinator_service.test_rounds import ARCH, FakeWorker, tiny_model


class Steps(FakeWorker):
    """An honest worker that ran `batches` local steps, its update growing with them."""

    def __init__(self, name, seed, batches: int, samples: int = 128):
        super().__init__(name, seed, samples=samples)
        self.batches = batches
        self.info.protocol_version, self.info.max_local_batches = "1.3", 1000

    def update(self):
        return {k: v + self.batches * self.step()[k] if v.is_floating_point() else v for k, v in self.state.items()}

    async def train(self, request, on_progress=None):
        result = await super().train(request)
        result.batches = self.batches
        return result


def _round(strategy, workers):
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runner = RoundRunner(model=model, architecture=ARCH, strategy=strategy, transfer=TransferSettings(chunk_size=7))
    report = asyncio.run(runner.run_round(1, workers))
    return start, model.state_dict(), report


def test_fednova_moves_the_model_by_the_normalised_updates_times_the_mean_steps():
    """x' = x + tau_eff * sum_i p_i (y_i - x) / a_i, here computed whole from the workers' updates."""
    momentum = 0.5
    workers = [
        Steps("pi4", 1, batches=10, samples=640),
        Steps("pi5", 2, batches=40, samples=2560),
        Steps("pi5b", 3, batches=30, samples=1920),
    ]
    start, after, report = _round(FedNova(local_seconds=5, batch_size=64, momentum=momentum), workers)

    def a(tau):
        return (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (1 - momentum)

    p = [w.samples / sum(w.samples for w in workers) for w in workers]
    tau_eff = sum(pi * a(w.batches) for pi, w in zip(p, workers))
    for w in workers:
        w.state = {k: v.clone() for k, v in start.items()}
    updates = [w.update() for w in workers]
    for name, x in start.items():
        if not x.is_floating_point():
            continue
        expected = x.double() + tau_eff * sum(
            pi * (u[name].double() - x.double()) / a(w.batches) for pi, u, w in zip(p, updates, workers)
        )
        torch.testing.assert_close(after[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert report.aggregate_scale > 1


def test_fednova_is_fedavg_when_every_worker_ran_the_same_steps():
    workers = lambda: [Steps("a", 1, batches=20), Steps("b", 2, batches=20)]  # noqa: E731
    _, nova, report = _round(FedNova(local_batches=20, batch_size=64), workers())
    _, avg, _ = _round(FedAvg(local_batches=20, batch_size=64), workers())
    assert report.aggregate_scale == pytest.approx(1.0)
    for k in avg:
        torch.testing.assert_close(nova[k], avg[k])


def test_fednova_step_norms():
    result = pb.TrainResult(round=1, batches=10, samples=640)
    assert FedNova().steps_norm(result) == 10
    # With momentum rho the step weights are (1 - rho^k) / (1 - rho), k = 1..tau: summed directly.
    assert FedNova(momentum=0.9).steps_norm(result) == pytest.approx(sum((1 - 0.9**k) / 0.1 for k in range(1, 11)))
    # With FedProx at learning rate eta each step shrinks the earlier ones by (1 - eta mu).
    assert FedNova(learning_rate=0.1, proximal_mu=0.5).steps_norm(result) == pytest.approx(
        sum(0.95**k for k in range(10))
    )
    with pytest.raises(ValueError, match="momentum or with FedProx"):
        FedNova(momentum=0.9, proximal_mu=0.1)


def test_worker_sampling_is_seeded_per_round_and_covers_everyone():
    workers = [f"pi{i}" for i in range(20)]
    index = workers.index
    strategy = FedAvg(fraction=0.25, seed=7)
    picks = [strategy.sample(r, workers, index) for r in range(1, 41)]
    assert all(len(p) == 5 and len(set(p)) == 5 for p in picks)
    assert picks == [FedAvg(fraction=0.25, seed=7).sample(r, list(reversed(workers)), index) for r in range(1, 41)]
    assert len({tuple(p) for p in picks}) > 30  # a different sample most rounds
    assert set().union(*picks) == set(workers)
    assert FedAvg(fraction=0.25, seed=8).sample(1, workers, index) != picks[0]
    assert len(FedAvg(workers_per_round=3).sample(1, workers, index)) == 3
    assert FedAvg(workers_per_round=30).sample(1, workers, index) == workers
    with pytest.raises(ValueError, match="--fraction"):
        FedAvg(fraction=0)


def test_only_the_sampled_workers_train_in_a_round():
    workers = [FakeWorker(f"w{i}", i) for i in range(6)]
    strategy = FedAvg(local_batches=2, batch_size=64, workers_per_round=2, seed=3)
    _, _, report = _round(strategy, workers)
    chosen = strategy.sample(1, workers, workers.index)
    assert sorted(w.worker for w in report.workers) == sorted(w.name for w in chosen)
    assert [w.trained for w in workers].count(True) == 2


def test_a_time_budget_is_sent_only_to_workers_that_understand_it():
    old, new = FakeWorker("old", 1), FakeWorker("new", 2)
    old.info.protocol_version, new.info.protocol_version = "1.2", "1.3"
    old.info.max_local_batches = new.info.max_local_batches = 1000
    _, _, report = _round(FedNova(local_seconds=5, batch_size=64), [old, new])
    [failure] = report.failures
    assert failure.worker == "old" and "--local-seconds" in failure.reason and "1.3" in failure.reason
    assert [w.worker for w in report.workers] == ["new"]


def test_a_time_budget_bounds_the_samples_by_the_workers_batch_limit():
    honest, greedy = FakeWorker("honest", 1, samples=64 * 100), FakeWorker("greedy", 2, samples=64 * 101)
    for w in (honest, greedy):
        w.info.protocol_version, w.info.max_local_batches = "1.3", 100
    _, _, report = _round(FedAvg(local_seconds=5, batch_size=64), [honest, greedy])
    [failure] = report.failures
    assert failure.worker == "greedy" and "5 seconds of batches of 64" in failure.reason


class Evaluates(FakeWorker):
    def __init__(self, name, seed, accuracy: float, test_samples: int):
        super().__init__(name, seed)
        self.info.protocol_version = "1.3"
        self.accuracy, self.test_samples = accuracy, test_samples

    async def evaluate(self, round_id):
        return pb.EvaluateResult(
            round_id=round_id,
            round=self.round,
            accuracy=self.accuracy,
            loss=1 - self.accuracy,
            samples=self.test_samples,
        )


def test_federated_evaluation_is_the_mean_weighted_by_test_samples():
    workers = [Evaluates("small", 1, 0.5, 100), Evaluates("big", 2, 0.9, 900)]
    runner = RoundRunner(
        model=tiny_model(),
        architecture=ARCH,
        strategy=FedAvg(local_batches=2, batch_size=64),
        transfer=TransferSettings(chunk_size=7),
        federated_evaluation=True,
    )
    report = asyncio.run(runner.run_round(1, workers))
    assert report.federated_accuracy == pytest.approx(0.86) and report.federated_samples == 1000
    # Each worker evaluated the new global model, sent to it after the round (the round id says so).
    assert all(w.round_id.endswith("/eval") for w in workers)
    assert workers[0].state.keys() == runner.model.state_dict().keys()
    for k, v in runner.model.state_dict().items():
        torch.testing.assert_close(workers[0].state[k], v)
