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
