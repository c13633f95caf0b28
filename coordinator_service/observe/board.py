"""Logs a worker's board trouble as it starts and ends: under-voltage, throttling, a capped frequency or the soft
temperature limit, from the health each Train progress message carries (protocol 1.10)."""

from __future__ import annotations

import structlog

from coordinator_service.engine.observer import RunObserver
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()

CONDITIONS = ("under_voltage", "throttled", "frequency_capped", "soft_temperature_limit")


class BoardWatch(RunObserver):
    def __init__(self) -> None:
        self.trouble: dict[str, tuple[str, ...]] = {}  # worker: the conditions it reported last

    def run_started(self, rounds, first_round, workers) -> None:
        self.trouble.clear()

    def worker_progress(self, worker: str, progress: pb.TrainProgress) -> None:
        health = progress.health
        now = tuple(c for c in CONDITIONS if getattr(health, c))
        before = self.trouble.get(worker, ())
        if now == before:
            return
        self.trouble[worker] = now
        extra = {"cpu_temperature_celsius": round(health.cpu_temperature_celsius, 1)}
        extra = extra if health.HasField("cpu_temperature_celsius") else {}
        if now:
            log.warning("worker_board_trouble", worker=worker, conditions=list(now), **extra)
        else:
            log.info("worker_board_recovered", worker=worker, conditions=list(before), **extra)


def board_summary(health: pb.BoardHealth, brief: bool = False) -> str:
    """A board's health in a few words (rich markup): "71.5°C, [red]throttled[/red], under-voltage since boot, 124 MiB
    free, 810 samples/s"; what the board cannot read is left out. Brief: the temperature and what is wrong now."""
    parts = []
    if health.HasField("cpu_temperature_celsius"):
        parts.append(f"{health.cpu_temperature_celsius:.1f}°C")
    for flag, word in (
        ("under_voltage", "under-voltage"),
        ("throttled", "throttled"),
        ("frequency_capped", "frequency capped"),
        ("soft_temperature_limit", "soft temperature limit"),
    ):
        if getattr(health, flag):
            parts.append(f"[red]{word}[/red]")
        elif getattr(health, f"{flag}_since_boot") and not brief:
            parts.append(f"{word} since boot")
    if brief:
        return " ".join(parts)
    if health.HasField("memory_available_bytes"):
        parts.append(f"{health.memory_available_bytes / 2**20:,.0f} MiB free")
    if health.HasField("samples_per_second"):
        parts.append(f"{health.samples_per_second:,.0f} samples/s")
    return ", ".join(parts)
