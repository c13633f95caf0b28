"""A whole training run: handshake with every worker, run the rounds, write the model and the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from coordinator_service.rounds import RoundReport, RoundRunner, TransferSettings
from coordinator_service.strategy import Strategy
from coordinator_service.worker_client import WorkerClient, WorkerError
from fedpi.data import Split
from fedpi.logs import is_console
from fedpi.models import build_model, parameter_count

log = structlog.get_logger()


class HandshakeFailed(Exception):
    """Fewer workers than required passed the handshake."""


@dataclass
class RunConfig:
    workers: list[tuple[str, str]]
    model: str
    rounds: int
    output_dir: Path
    min_workers: int
    dataset: str | None = None  # what the coordinator evaluates on; workers should report the same
    init_seed: int = 0
    rpc_timeout: float = 30.0
    idle_timeout: float = 120.0
    round_timeout: float = 3600.0
    transfer: TransferSettings = TransferSettings()


async def handshake(clients: list[WorkerClient], model: str, min_workers: int, dataset: str | None) -> list[WorkerClient]:
    infos = await asyncio.gather(*(c.handshake(model) for c in clients), return_exceptions=True)
    ready = []
    for client, info in zip(clients, infos):
        if isinstance(info, WorkerError):
            log.error("worker_handshake_failed", worker=client.name, address=client.address, reason=str(info))
            continue
        if isinstance(info, BaseException):
            raise info
        if info.worker_id and client.name == client.address:
            client.name = info.worker_id  # found by address (DNS discovery): use the name the worker gives itself
        log.info("worker_ready", worker=client.name, address=client.address, protocol=info.protocol_version,
                 software=info.software_version, dataset=info.dataset, partition=info.partition,
                 train_samples=info.train_samples, arch=info.cpu_architecture, torch=info.torch_version)
        if dataset and info.dataset != dataset:
            log.warning("dataset_differs", worker=client.name, worker_dataset=info.dataset, coordinator_dataset=dataset)
        ready.append(client)
    if len(ready) < min_workers:
        raise HandshakeFailed(f"only {len(ready)} of {len(clients)} workers passed the handshake, "
                              f"need {min_workers} (--min-workers); see the worker_handshake_failed events")
    return ready


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


async def run(cfg: RunConfig, strategy: Strategy, test_split: Split | None) -> list[RoundReport]:
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model, seed=cfg.init_seed)
    clients = [WorkerClient(n, a, rpc_timeout=cfg.rpc_timeout, idle_timeout=cfg.idle_timeout) for n, a in cfg.workers]
    reports: list[RoundReport] = []
    try:
        ready = await handshake(clients, cfg.model, cfg.min_workers, cfg.dataset)
        log.info("training_started", model=cfg.model, parameters=parameter_count(model), rounds=cfg.rounds,
                 workers=[c.name for c in ready])
        runner = RoundRunner(clients=ready, model=model, architecture=cfg.model, strategy=strategy,
                             test_split=test_split, transfer=cfg.transfer, round_timeout=cfg.round_timeout)
        metrics_path = cfg.output_dir / "metrics.jsonl"
        metrics_path.unlink(missing_ok=True)
        for server_round in range(1, cfg.rounds + 1):
            report = await runner.run_round(server_round)
            reports.append(report)
            event = report.as_event()
            # On a terminal the per-worker table would drown the line; metrics.jsonl always has it.
            shown = {k: v for k, v in event.items() if k != "workers"} if is_console() else event
            log.info("round_finished", **shown, total_rounds=cfg.rounds)
            with metrics_path.open("a") as f:
                f.write(json.dumps(event) + "\n")
        model_path = cfg.output_dir / "model.pt"
        _write_atomically(model_path, lambda p: torch.save(model.state_dict(), p))
        log.info("training_finished", rounds=len(reports), model_path=str(model_path), metrics_path=str(metrics_path),
                 test_accuracy=round(reports[-1].test_accuracy, 4) if reports else None,
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return reports
