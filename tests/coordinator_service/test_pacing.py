"""What boards' health changes about their work, against fake workers that report it (values a Pi would give; no
Pi needed): a throttled board gets fewer batches in proportion to the throughput it lost, one short of memory sits
the round out with the reason, and a board that reports nothing is left alone."""

from __future__ import annotations

import asyncio

import pytest

from coordinator_service.engine.pacing import MEMORY_MARGIN_BYTES, SKIPPED
from coordinator_service.engine.rounds import RoundFailed
from fedpi.net.protocol import PROTOCOL_VERSION
from generated.fedpi.v1 import worker_pb2 as pb
from tests.coordinator_service.test_rounds import FakeWorker, _runner, tiny_model


class Board(FakeWorker):
    """Trains `samples` samples in `seconds` and reports the health it is given in its progress."""

    def __init__(self, name: str, seed: int, samples: int = 128):
        super().__init__(name, seed, samples)
        self.info.protocol_version = PROTOCOL_VERSION
        self.seconds = 1.0
        self.health = pb.BoardHealth()
        self.requests: list[pb.TrainRequest] = []

    async def get_info(self) -> pb.WorkerInfo:
        self.info.health.CopyFrom(self.health)
        return self.info

    async def train(self, request, on_progress=None):
        self.requests.append(pb.TrainRequest.FromString(request.SerializeToString()))
        if on_progress is not None:
            on_progress(pb.TrainProgress(batches_done=1, batches_total=2, health=self.health))
        result = await super().train(request)
        result.train_seconds = self.seconds
        return result


def _rounds(runner, workers, n: int, between=lambda r: None):
    async def go():
        reports = []
        for r in range(1, n + 1):
            between(r)
            reports.append(await runner.run_round(r, workers))
        return reports

    return asyncio.run(go())


def test_a_throttled_board_trains_fewer_batches_in_proportion_to_the_throughput_it_lost():
    """Round 1 at full speed sets the board's best; in round 2 it throttles and trains at 40% of that; round 3 asks
    it for 40% of the batches, and the unthrottled board still gets them all. Cooled down, it gets all of them again."""
    runner = _runner(tiny_model(), min_workers=1)  # FedAvg asks each worker for 2 batches
    runner.strategy.local_batches = 10
    hot, cool = Board("hot", 1), Board("cool", 2)

    def weather(r: int) -> None:
        if r == 2:
            hot.health, hot.seconds = pb.BoardHealth(throttled=True), 2.5
        if r == 4:
            hot.health, hot.seconds = pb.BoardHealth(), 1.0

    reports = _rounds(runner, [hot, cool], 5, weather)
    assert [q.local_batches for q in hot.requests] == [10, 10, 4, 4, 10]
    assert [q.local_batches for q in cool.requests] == [10] * 5
    assert all(not r.failures for r in reports)


def test_time_budgets_and_boards_that_report_nothing_are_never_paced():
    runner = _runner(tiny_model())
    runner.strategy.local_batches, runner.strategy.local_seconds = 0, 5.0
    timed = Board("timed", 1)
    silent = FakeWorker("silent", 2)
    for w in (timed, silent):
        w.info.protocol_version, w.info.max_local_batches = PROTOCOL_VERSION, 1000

    def weather(r: int) -> None:
        if r == 2:
            timed.health, timed.seconds = pb.BoardHealth(throttled=True), 4.0

    _rounds(runner, [timed, silent], 3, weather)
    assert [q.local_seconds for q in timed.requests] == [5.0] * 3
    assert [q.local_batches for q in timed.requests] == [0] * 3


def test_a_board_short_of_memory_sits_the_round_out_with_the_reason():
    model = tiny_model()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    runner = _runner(model)
    low, fine = Board("low", 1), Board("fine", 2)
    # The board is short (its handshake said so, and asked again before the round it says so still); the other
    # has exactly what the model needs.
    low.health.memory_available_bytes = model_bytes + MEMORY_MARGIN_BYTES - 1
    low.info.health.CopyFrom(low.health)
    fine.info.health.memory_available_bytes = model_bytes + MEMORY_MARGIN_BYTES

    report = asyncio.run(runner.run_round(1, [low, fine]))

    assert [w.worker for w in report.workers] == ["fine"] and not low.requests
    assert [(f.worker, f.phase) for f in report.absent] == [("low", SKIPPED)]
    assert "64 MiB of memory available" in report.absent[0].reason
    # Another process on it ends: asked again before the next round, it says so, and trains.
    low.health.memory_available_bytes = 1 << 30
    report = asyncio.run(runner.run_round(2, [low, fine]))
    assert sorted(w.worker for w in report.workers) == ["fine", "low"] and not report.absent


def test_a_round_whose_every_board_is_short_of_memory_fails_saying_why():
    runner = _runner(tiny_model())
    low = Board("low", 1)
    low.health.memory_available_bytes = 1 << 20
    low.info.health.CopyFrom(low.health)
    with pytest.raises(RoundFailed, match="low: its board reports 1 MiB of memory available"):
        asyncio.run(runner.run_round(1, [low]))
