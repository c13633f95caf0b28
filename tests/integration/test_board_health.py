"""A real worker reads its board (a fake Raspberry Pi tree) and reports it in GetInfo, Train's progress and
Prometheus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from coordinator_service.local import LocalWorker, free_port
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.integration.conftest import DIGITS, METADATA, events, run_coordinator, start_cluster
from tests.integration.faults import CoordinatorRun
from tests.integration.test_metrics import scrape, value
from tests.worker_service.test_board import fake_pi

# A long scenario (boards throttled and short of memory over many rounds):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario


def test_a_worker_reports_its_board_in_get_info_train_progress_and_metrics(tmp_path):
    board = fake_pi(tmp_path / "board")
    port = free_port()
    args = [*DIGITS, "--board-root", str(board), "--metrics-port", str(port), "--train-delay", "0.05"]
    cluster = start_cluster([LocalWorker("alice", [*args, "--progress-interval", "0.2"], tmp_path)])
    try:
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(cluster.workers[0].address))
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
        assert info.health.cpu_temperature_celsius == pytest.approx(71.54)
        assert info.health.throttled and info.health.under_voltage_since_boot
        assert not info.health.HasField("samples_per_second")  # nothing trained yet

        request = pb.TrainRequest(round=0, local_batches=12, batch_size=32, learning_rate=0.01)
        updates = list(stub.Train(request, metadata=METADATA, timeout=60))
        progress = [u.progress for u in updates if u.HasField("progress")]
        assert progress and all(p.health.throttled for p in progress)
        rates = [p.health.samples_per_second for p in progress if p.batches_done]
        assert rates and all(0 < r < 32 / 0.05 for r in rates)  # 32 samples a batch, at least 0.05 s a batch

        # Cooled down and powered properly: the next reading says so.
        (board / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text("0x50000\n")
        (board / "sys/class/thermal/thermal_zone1/temp").write_text("52000\n")
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
        assert not info.health.throttled and info.health.throttled_since_boot
        assert 0 < info.health.samples_per_second < 32 / 0.05  # the Train that finished
        samples = scrape(port)
        assert value(samples, "fedpi_worker_cpu_temperature_celsius") == 52.0
        assert value(samples, "fedpi_worker_throttled") == 0.0
        assert value(samples, "fedpi_worker_throttled_since_boot") == 1.0
        assert value(samples, "fedpi_worker_memory_available_bytes") == 124 * 2**20

        status = subprocess.run(
            [sys.executable, "-m", "fedpi_cli", "status", "--workers", cluster.spec, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        health = json.loads(status.stdout)[0]["health"]
        assert health["cpuTemperatureCelsius"] == 52.0 and health["throttledSinceBoot"] and not health["throttled"]
    finally:
        cluster.stop()


def test_a_board_short_of_memory_sits_rounds_out_until_it_has_enough(tmp_path):
    """A real worker whose (fake) board has 32 MiB available is skipped with the reason while the other trains;
    once it reports enough it is asked again before the next round and trains."""
    short, fine = fake_pi(tmp_path / "short", cgroup=False), fake_pi(tmp_path / "fine")
    meminfo = short / "proc/meminfo"
    meminfo.write_text("MemTotal:        3884000 kB\nMemAvailable:      32768 kB\n")
    workers = [
        LocalWorker("alice", [*DIGITS, "--partition", "0/2", "--board-root", str(short)], tmp_path),
        LocalWorker("bob", [*DIGITS, "--partition", "1/2", "--board-root", str(fine)], tmp_path),
    ]
    cluster = start_cluster(workers)
    try:
        done = run_coordinator(
            "train", "--workers", cluster.spec, "--rounds", "1", "--local-batches", "2", "--min-workers", "1"
        )
        assert done.returncode == 0, done.stderr
        skipped = [e for e in events(done.stdout) if e.get("event") == "worker_skipped"]
        assert [(e["worker"], e["phase"]) for e in skipped] == [("alice", "short of memory")]
        assert "32 MiB of memory available" in skipped[0]["reason"]
        finished = next(e for e in events(done.stdout) if e.get("event") == "round_finished")
        assert sorted(finished["workers"]) == ["bob"]
        assert [(a["worker"], a["phase"]) for a in finished["absent"]] == [("alice", "short of memory")]

        meminfo.write_text("MemTotal:        3884000 kB\nMemAvailable:    2000000 kB\n")
        done = run_coordinator(
            "train", "--workers", cluster.spec, "--rounds", "1", "--local-batches", "2", "--min-workers", "1"
        )
        assert done.returncode == 0, done.stderr
        finished = next(e for e in events(done.stdout) if e.get("event") == "round_finished")
        assert sorted(finished["workers"]) == ["alice", "bob"] and not finished.get("absent")
    finally:
        cluster.stop()


def _duty_cycle(pid: int, stop: threading.Event, running: float = 0.03, paused: float = 0.05) -> None:
    """Run the process `running` s out of every `running + paused`: a board its firmware has slowed."""
    try:
        while not stop.is_set():
            time.sleep(running)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(paused)
            os.kill(pid, signal.SIGCONT)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_real_board_that_throttles_gets_fewer_batches_until_it_recovers(tmp_path):
    """A real worker reads a fake Pi tree. After round 1 the tree says "throttled now" and the process is slowed to
    about 40% of its speed; the round after it has trained slowly gets proportionally fewer batches, with the event
    that says why. Cooled down again, it gets all of them."""
    board = fake_pi(tmp_path / "board", throttled="0x0")
    flags = board / "sys/devices/platform/soc/soc:firmware/get_throttled"
    args = [*DIGITS, "--board-root", str(board), "--train-delay", "0.02", "--progress-interval", "0.2"]
    cluster = start_cluster([LocalWorker("alice", args, tmp_path)])
    stop = threading.Event()
    try:
        run = CoordinatorRun("train", "--workers", cluster.spec, "--rounds", "5", "--local-batches", "30",
                             "--output-dir", str(tmp_path / "run"))  # fmt: skip
        run.wait_for("round_finished", round=1)
        flags.write_text("0x50004\n")  # throttled now (bit 2), and since boot
        slow = threading.Thread(target=_duty_cycle, args=(cluster.workers[0].process.pid, stop), daemon=True)
        slow.start()
        reduced = run.wait_for("worker_work_reduced", timeout=120)
        run.wait_for("round_finished", round=reduced["round"])
        stop.set()
        slow.join()
        flags.write_text("0x50000\n")  # cooled down: throttled since boot only
        assert run.finish() == 0, "".join(run.lines[-30:])
    finally:
        stop.set()
        cluster.stop()
    assert reduced["worker"] == "alice" and reduced["asked"] == 30 and 3 <= reduced["batches"] < 25, reduced
    assert "its board is throttled and trains" in reduced["reason"]
    batches = {r["round"]: r["workers"]["alice"]["batches"] for r in run.rounds()}
    assert batches[1] == 30 and batches[reduced["round"]] == reduced["batches"]
    assert batches[5] == 30  # it reported no throttling once the tree said so
