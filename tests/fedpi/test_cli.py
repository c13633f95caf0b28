"""Every flag settable from FEDPI_<FLAG>, for Kubernetes."""

from __future__ import annotations

from coordinator_service.__main__ import parse_args as coordinator_args
from worker_service.__main__ import parse_args as worker_args


def test_worker_flags_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_PORT", "6000")
    monkeypatch.setenv("FEDPI_PARTITION_INDEX", "2")
    monkeypatch.setenv("FEDPI_NO_DOWNLOAD", "true")
    args = worker_args([])
    assert (args.port, args.partition_index, args.no_download) == (6000, 2, True)


def test_command_line_beats_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_PORT", "6000")
    assert worker_args(["--port", "7000"]).port == 7000


def test_coordinator_subcommand_flags_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDPI_ROUNDS", "3")
    monkeypatch.setenv("FEDPI_WORKERS_DNS", "fedpi-worker:50051")
    monkeypatch.setenv("FEDPI_LR", "0.1")
    args = coordinator_args(["train"])
    assert (args.rounds, args.workers_dns, args.lr) == (3, "fedpi-worker:50051", 0.1)


def test_presets_set_defaults_that_flags_and_the_environment_override(monkeypatch):
    default = coordinator_args(["demo"])
    seed = coordinator_args(["demo", "--preset", "seed"])
    assert (seed.lr, seed.momentum, seed.local_batches, seed.batch_size) == (0.01, 0.0, 50, 64)
    assert (default.lr, default.momentum) != (seed.lr, seed.momentum)
    assert coordinator_args(["train", "--preset=seed", "--lr", "0.2"]).lr == 0.2
    monkeypatch.setenv("FEDPI_MOMENTUM", "0.3")
    assert coordinator_args(["demo", "--preset", "seed"]).momentum == 0.3
    monkeypatch.setenv("FEDPI_PRESET", "seed")
    assert coordinator_args(["demo"]).lr == 0.01
