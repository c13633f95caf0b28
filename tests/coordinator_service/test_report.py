"""`fedpi report`: a self-contained report.html, rendered by headless Chromium (Debian's `chromium`) and checked for
its plots. Without Chromium only the HTML checks run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from coordinator_service.engine.rounds import RoundReport, WorkerRound
from coordinator_service.observe.report import ReportUnavailable, write_report
from coordinator_service.policy.strategy import Failure
from fedpi_cli import main as fedpi

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run_dir(tmp_path, rounds: int = 20):
    """A 20-round run's metrics.jsonl: bob drops out in round 5 and rejoins in round 8."""
    lines = []
    for r in range(1, rounds + 1):
        names = ["alice", "charlie"] + ([] if 5 <= r < 8 else ["bob"])
        workers = [
            WorkerRound(n, samples=3200, train_seconds=2.0 + i / 10, bytes_sent=1_724_320, bytes_received=1_724_320)
            for i, n in enumerate(names)
        ]
        failures = [Failure("bob", "train", "UNAVAILABLE")] if r == 5 else []
        absent = [Failure("dave", "refused", "task tiny 1.0, coordinator trains mnist")] if r <= 3 else []
        report = RoundReport(
            r,
            workers=workers,
            failures=failures,
            absent=absent,
            test_accuracy=1 - 0.5 / r,
            test_loss=1 / r,
            wall_seconds=2.5,
        )
        lines.append(json.dumps(report.as_event()))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "started_at": "2026-12-06T05:30:00Z",
                "model": "reference-cnn",
                "dataset": "digits-5k",
                "rounds": rounds,
                "lr": 0.05,
            }
        )
    )
    return tmp_path


def test_the_report_is_one_self_contained_page(tmp_path):
    out = write_report(_run_dir(tmp_path))
    page = out.read_text()
    assert len(re.findall(r'<img id="\w+" alt="[^"]+" src="data:image/png;base64,', page)) == 3
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
    assert "97.50%" in page and "reference-cnn" in page and "worker failures in rounds" in page
    assert "2026-12-06 05:30:00 UTC" in page and "the offline fallback" in page  # when, and on what data
    assert "<td>dave</td><td>refused</td><td>1-3</td><td>task tiny 1.0, coordinator trains mnist</td>" in page
    assert "<td>bob</td><td>train</td><td>5</td><td>UNAVAILABLE</td>" in page
    assert page.count("<tr><td>") >= 20  # a row per round
    assert {p.name for p in tmp_path.glob("*.png")} == {"accuracy.png", "workers.png", "timeline.png"}


def test_fedpi_report_explains_a_directory_without_metrics(tmp_path, capsys):
    assert fedpi(["report", str(tmp_path)]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(ReportUnavailable):
        write_report(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_plots_offline(tmp_path):
    from PIL import Image

    out = write_report(_run_dir(tmp_path))
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ]  # no network, at all
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("data:image/png;base64,") == 3 and "Failures and rejoins" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    # The plots are drawn: the page holds the plots' blue and red lines and the timeline's green and red cells.
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 500
    near = lambda rgb: any(sum(abs(a - b) for a, b in zip(c, rgb)) < 40 for c in colours)  # noqa: E731
    assert near((31, 119, 180)) and near((46, 125, 50)) and near((198, 40, 40))


def test_board_temperatures_get_their_own_panel_with_the_throttled_rounds_marked(tmp_path):
    from coordinator_service.observe.report import _pyplot, _workers_figure
    from generated.fedpi.v1 import worker_pb2 as pb

    rounds = []
    for r in range(1, 6):
        pi, laptop = (
            WorkerRound("pi", samples=100, train_seconds=1.0),
            WorkerRound("laptop", samples=100, train_seconds=1.0),
        )
        for celsius in (60.0 + r, 70.0 + 2 * r):  # two progress messages: the hotter one counts
            pi.saw_board(pb.BoardHealth(cpu_temperature_celsius=celsius, throttled=r >= 4 and celsius > 70))
        laptop.saw_board(pb.BoardHealth(memory_available_bytes=1 << 30))
        rounds.append(json.loads(json.dumps(RoundReport(r, workers=[pi, laptop]).as_event())))
    assert rounds[0]["workers"]["pi"]["cpu_temperature_celsius"] == 72.0
    assert "cpu_temperature_celsius" not in rounds[0]["workers"]["laptop"]  # absent, not 0
    assert [r["workers"]["pi"]["board_trouble"] for r in rounds] == [False, False, False, True, True]
    fig = _workers_figure(_pyplot(), rounds, ["pi", "laptop"])
    board = fig.axes[2]
    assert board.get_title() == "Board CPU temperature"
    lines = {line.get_label(): line for line in board.get_lines()}
    assert set(lines) == {"pi", "pi throttled"}  # the laptop reports no temperature: no line
    assert list(lines["pi"].get_ydata()) == [72.0, 74.0, 76.0, 78.0, 80.0]
    assert list(lines["pi throttled"].get_xdata()) == [4, 5]
    plain = [
        json.loads(json.dumps(RoundReport(1, workers=[WorkerRound("x", samples=1, train_seconds=1.0)]).as_event()))
    ]
    assert len(_workers_figure(_pyplot(), plain, ["x"]).axes) == 2


def test_an_asynchronous_run_reports_its_mode_staleness_and_idle_share(tmp_path):
    lines = []
    for v in (1, 2):
        report = RoundReport(
            v,
            workers=[WorkerRound("alice", samples=64, staleness=v - 1), WorkerRound("bob", samples=64, staleness=3)],
            test_accuracy=0.9,
            test_loss=0.3,
            wall_seconds=1.0,
            version=v,
            idle_fraction={"alice": 0.012, "bob": 0.25},
        )
        lines.append(json.dumps(report.as_event()))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    config = {"mode": "async", "buffer_size": 2, "max_staleness": 10, "staleness_exponent": 0.5, "rounds": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    page = write_report(tmp_path).read_text()
    assert "async (FedBuff): buffer 2, max staleness 10, staleness exponent 0.5" in page
    assert "mean 1.75, max 3 versions" in page  # (0 + 3 + 1 + 3) / 4
    assert "alice 1.2%, bob 25.0%" in page
