"""The terminal's live view, rendered into a recording console."""

from __future__ import annotations

import io

from rich.console import Console

from coordinator_service.engine.rounds import RoundReport, WorkerRound
from coordinator_service.observe.progress import EventView, LiveProgress
from coordinator_service.policy.strategy import Failure
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
    report = RoundReport(
        1,
        workers=[WorkerRound("alice", bytes_sent=1_000_000, bytes_received=1_000_000, train_seconds=3.0)],
        failures=[Failure("bob", "train", "UNAVAILABLE")],
        test_accuracy=0.9123,
        test_loss=0.3,
        wall_seconds=3.5,
    )
    view.round_finished(report)
    view.run_finished()
    screen = console.export_text()
    assert "round   1  accuracy 91.23%" in screen and "  2.0 MB" in screen and "bob dropped (train)" in screen
    assert "1/5" in screen


def test_log_lines_print_above_the_view():
    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    view.run_started(rounds=2, first_round=1, workers=["alice"])
    view.log_file().write("2026-11-26 [warning] worker_unavailable worker=bob\n")
    view.run_finished()
    assert "worker_unavailable worker=bob" in console.export_text()


def _events(rounds: int = 10) -> list[dict]:
    """What WatchRun sends for a run of three workers, two rounds of it."""
    workers = ["alice", "bob", "charlie"]
    out = [{"event": "training_started", "rounds": rounds, "first_round": 1, "workers": workers}]
    for r in (1, 2):
        out.append({"event": "round_started", "round": r, "workers": workers})
        for w in workers:
            out.append(
                {
                    "event": "worker_progress",
                    "round": r,
                    "worker": w,
                    "batches_done": 25,
                    "batches_total": 50,
                    "mean_loss": 0.51234,
                    "seconds": 1.0,
                    "heartbeat": False,
                }
            )
        out += [{"event": "worker_train_finished", "worker": w, "samples": 3200, "seconds": 2.0} for w in workers[:2]]
        out.append(
            {
                "event": "worker_dropped",
                "worker": "charlie",
                "phase": "train",
                "reason": "UNAVAILABLE: the worker went away mid-round, its update is lost for this round",
            }
        )
        w = {"samples": 3200, "train_seconds": 2.0, "bytes_sent": 1_724_320, "bytes_received": 1_724_320}
        out.append(
            {
                "event": "round_finished",
                "round": r,
                "test_accuracy": 0.9 + r / 100,
                "test_loss": 0.3,
                "wall_seconds": 2.5,
                "overhead_seconds": 0.03,
                "workers": {"alice": w, "bob": w},
                "failures": [{"worker": "charlie", "phase": "train", "reason": "UNAVAILABLE"}],
                "absent": [{"worker": "dave", "phase": "refused", "reason": "another task"}],
            }
        )
    return out


def test_the_watch_view_is_the_train_view_fed_by_events_within_100_columns():
    console = Console(file=io.StringIO(), record=True, force_terminal=True, width=100)
    view = EventView(batch_size=64, rounds=10, console=console)

    def screen() -> list[str]:  # what the live part shows now, as a 100-column terminal draws it
        frame = Console(file=io.StringIO(), record=True, width=100)
        frame.print(view.view._render())
        return frame.export_text().splitlines()

    assert "waiting for the run's first events" in screen()
    events = _events()
    for event in events[:6]:  # round 1 under way
        view.feed(event)
    now = screen()
    assert "0/10" in now[0] and "round 1" in now and any("25/50" in line and "0.5123" in line for line in now)
    for event in events[6:]:
        view.feed(event)
    now = screen()
    assert "2/10" in now[0] and "-:--:--" not in now[0]  # an ETA from the second round on
    assert any(
        line.startswith("charlie  dropped (train: UNAVAILABLE") and line.endswith("…") for line in now[2:]
    ) or any("charlie" in line and "…" in line for line in now)
    view.close()
    printed = console.export_text()
    assert "round   1  accuracy 91.00%" in printed and "round   2  accuracy 92.00%" in printed
    assert all(len(line) <= 100 for line in now), now
    # a round's row, as printed above the live part: within 100 columns, who did not train on a line of its own
    rows = Console(file=io.StringIO(), record=True, width=100)
    LiveProgress(batch_size=64, console=rows).print_round(events[-1])
    assert rows.export_text().splitlines() == [
        "round   2  accuracy 92.00%  loss 0.3000  wall 2.50 s  overhead 0.03 s  6.9 MB  2 trained",
        "           charlie dropped (train), dave refused",
    ]


def test_the_train_view_shows_the_rounds_to_come_before_the_first():
    console = _console()
    view = LiveProgress(batch_size=64, console=console, rounds=10)
    view.start()
    view.live.refresh()
    view.run_finished()
    screen = console.export_text()
    assert "0/10" in screen and "starting: waiting for the workers" in screen


def test_a_round_finishing_while_the_next_trains_leaves_the_next_round_s_lines_alone():
    view = EventView(batch_size=64, rounds=3, console=_console())
    events = _events()
    round_2 = events.index(next(e for e in events if e["event"] == "round_started" and e["round"] == 2))
    finished_1 = next(e for e in events if e["event"] == "round_finished")
    for event in [e for e in events[:round_2] if e is not finished_1] + events[round_2 : round_2 + 2]:
        view.feed(event)
    view.feed(finished_1)  # round 1's evaluation ends while round 2 trains
    assert view.view.lines["alice"].state == "training"
    view.close()


def test_a_boards_temperature_and_trouble_show_in_its_row_from_the_loop_or_from_events(caplog):
    health = pb.BoardHealth(cpu_temperature_celsius=71.54, throttled=True, under_voltage_since_boot=True)
    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    view.run_started(rounds=5, first_round=1, workers=["alice"])
    view.worker_progress("alice", pb.TrainProgress(batches_done=2, batches_total=50, seconds=1.0, health=health))
    view.live.refresh()
    view.run_finished()
    assert any(
        "alice" in line and line.rstrip().endswith("71.5°C throttled") for line in console.export_text().splitlines()
    )

    watch = EventView(batch_size=64, rounds=5, console=_console())
    event = {"event": "worker_progress", "round": 1, "worker": "bob", "batches_done": 1, "seconds": 1.0}
    watch.feed({**event, "health": {"cpu_temperature_celsius": 48.0, "under_voltage": True}})
    assert watch.view.lines["bob"].board == "48.0°C [red]under-voltage[/red]"
    watch.feed({**event, "health": {"cpu_temperature_celsius": "hot", "x": [1]}})  # what no server sends: ignored
    watch.feed({**event, "health": "melting"})
    assert watch.view.lines["bob"].board == ""
    watch.close()


def test_asynchronous_versions_show_as_versions_in_the_view_and_in_prometheus():
    from prometheus_client import CollectorRegistry

    from coordinator_service.observe.metrics import PrometheusObserver

    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    view.run_started(rounds=9, first_round=1, workers=["alice", "bob"])
    report = RoundReport(
        3,
        workers=[WorkerRound("alice", staleness=2), WorkerRound("bob", staleness=0)],
        test_accuracy=0.97,
        test_loss=0.1,
        wall_seconds=1.5,
        aggregation_seconds=0.04,
        version=3,
        idle_fraction={"alice": 0.01, "bob": 0.2},
    )
    view.round_finished(report)
    metrics.round_finished(report)
    view.live.refresh()
    view.run_finished()
    screen = console.export_text()
    assert "version   3  accuracy 97.00%" in screen and "overhead 0.04 s" in screen
    assert "version 3 made; every worker trains on" in screen
    assert registry.get_sample_value("fedpi_round") == 3
    assert registry.get_sample_value("fedpi_update_staleness", {"worker": "alice"}) == 2
    assert registry.get_sample_value("fedpi_worker_idle_fraction", {"worker": "bob"}) == 0.2


def test_prometheus_serves_the_update_agreement_of_the_last_round():
    from prometheus_client import CollectorRegistry

    from coordinator_service.observe.metrics import PrometheusObserver

    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    metrics.round_finished(RoundReport(1, update_agreement=0.15))
    metrics.round_finished(RoundReport(2))  # a round without a measure leaves the last one
    assert registry.get_sample_value("fedpi_update_agreement") == 0.15


def test_the_view_says_when_auto_turns_feddyn_on_and_by_what_agreement():
    console = _console()
    view = LiveProgress(batch_size=64, console=console)
    view.run_started(rounds=3, first_round=1, workers=["alice"])
    for number, name, agreement in ((1, "fedavg", 0.12), (2, "feddyn", 0.3), (3, "feddyn", 0.2)):
        report = RoundReport(number, test_accuracy=0.9, test_loss=0.3, update_agreement=agreement)
        report.server_optimizer = name
        view.round_finished(report)
    view.run_finished()
    screen = console.export_text()
    assert "server optimizer feddyn from this round: round 1's updates agreed 0.12" in screen
    assert screen.count("server optimizer") == 1
