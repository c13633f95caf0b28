"""Rounds are evaluated, checkpointed and logged after they end, in order, on the model as it was when they ended."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
import torch

from coordinator_service.engine import checkpoint
from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.rounds import RoundReport
from coordinator_service.engine.training import RoundFinisher, RunConfig
from coordinator_service.policy.server_opt import ServerOptimizer


class SlowTask(SimpleNamespace):
    """Evaluation waits until the test lets it go, and reports the model's weight as its loss."""

    architecture = "tiny"

    def __init__(self):
        super().__init__(release=threading.Event(), evaluated=[])

    def evaluate(self, model, split):
        assert self.release.wait(10)
        weight = float(model.weight.detach().sum())
        self.evaluated.append(weight)
        return weight, 0.5


class Finished(RunObserver):
    def __init__(self):
        self.rounds: list[int] = []

    def round_finished(self, report: RoundReport) -> None:
        self.rounds.append(report.round)


def _finisher(tmp_path, sequential: bool):
    task = SlowTask()
    cfg = RunConfig(
        workers=[], task=task, rounds=3, output_dir=tmp_path, min_workers=1, sequential_evaluation=sequential
    )
    observer = Finished()
    return RoundFinisher(cfg, "test split", observer, [], tmp_path / "metrics.jsonl", ServerOptimizer()), task, observer


def _set(model: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def test_a_round_is_evaluated_and_checkpointed_as_it_ended_while_the_next_one_changes_the_model(tmp_path):
    finisher, task, observer = _finisher(tmp_path, sequential=False)
    model = torch.nn.Linear(2, 1, bias=False)

    async def rounds():
        _set(model, 1.0)
        await finisher.submit(RoundReport(1), model)  # returns at once: evaluation waits in a thread
        assert observer.rounds == []
        _set(model, 2.0)  # round 2 installs its aggregate while round 1 is still being evaluated
        task.release.set()
        await finisher.submit(RoundReport(2), model)  # waits for round 1 first
        assert observer.rounds == [1]
        await finisher.drain()

    asyncio.run(rounds())
    assert task.evaluated == [2.0, 4.0]  # round 1 as it ended, not the model round 2 left
    assert observer.rounds == [1, 2]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["test_loss"]) for m in lines] == [(1, 2.0), (2, 4.0)]
    saved = checkpoint.load(tmp_path, "tiny")
    assert saved.round == 2 and float(saved.state_dict["weight"].sum()) == 4.0


def test_sequential_evaluation_finishes_each_round_before_submit_returns(tmp_path):
    finisher, task, observer = _finisher(tmp_path, sequential=True)
    model = torch.nn.Linear(2, 1, bias=False)
    task.release.set()

    async def one_round():
        _set(model, 3.0)
        await finisher.submit(RoundReport(1), model)
        assert observer.rounds == [1]
        assert checkpoint.load(tmp_path, "tiny").round == 1

    asyncio.run(one_round())
    assert task.evaluated == [6.0]


def test_a_failing_evaluation_is_raised_by_drain_and_only_logged_by_settle(tmp_path):
    finisher, task, observer = _finisher(tmp_path, sequential=False)
    task.evaluate = lambda model, split: 1 / 0
    model = torch.nn.Linear(2, 1, bias=False)

    async def failing():
        await finisher.submit(RoundReport(1), model)
        with pytest.raises(ZeroDivisionError):
            await finisher.drain()
        await finisher.submit(RoundReport(2), model)
        await finisher.settle()

    asyncio.run(failing())
    assert observer.rounds == [] and not (tmp_path / checkpoint.CHECKPOINT_NAME).exists()
