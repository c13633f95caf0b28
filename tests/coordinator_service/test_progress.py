"""The terminal's live view, rendered into a recording console."""

from __future__ import annotations

import io

from rich.console import Console

from coordinator_service.progress import LiveProgress
from coordinator_service.rounds import RoundReport, WorkerRound
from coordinator_service.strategy import Failure
from generated.fedpi.v1 import worker_pb2 as pb


def _console() -> Console:
    return Console(file=io.StringIO(), record=True, force_terminal=True, width=120)


def test_the_live_view_shows_each_worker_the_round_bar_and_a_row_per_round():
    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    view.run_started(rounds=5, first_round=1, workers=["alice", "bob", "charlie"])
    view.round_started(1, ["alice", "bob"])
    view.worker_phase("alice", "training")
    view.worker_progress("alice", pb.TrainProgress(batches_done=20, batches_total=50, mean_loss=0.25, seconds=2.0))
    view.worker_phase("bob", "dropped", "train: UNAVAILABLE")
    view.live.refresh()
    screen = console.export_text()
    assert "round 1" in screen and "0/5" in screen
    assert "alice" in screen and "20/50" in screen and "0.2500" in screen and "640" in screen  # 20 x 64 / 2 s
    assert "dropped (train: UNAVAILABLE)" in screen and "not sampled" in screen
    report = RoundReport(1, workers=[WorkerRound("alice", bytes_sent=1_000_000, bytes_received=1_000_000,
                                                 train_seconds=3.0)],
                         failures=[Failure("bob", "train", "UNAVAILABLE")], test_accuracy=0.9123, test_loss=0.3,
                         wall_seconds=3.5)
    view.round_finished(report)
    view.run_finished()
    screen = console.export_text()
    assert "round   1  accuracy  91.23%" in screen and "moved     2.0 MB" in screen and "dropped: bob" in screen
    assert "1/5" in screen


def test_log_lines_print_above_the_view():
    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    view.run_started(rounds=2, first_round=1, workers=["alice"])
    view.log_file().write("2026-11-26 [warning] worker_unavailable worker=bob\n")
    view.run_finished()
    assert "worker_unavailable worker=bob" in console.export_text()
