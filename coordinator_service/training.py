"""A whole training run: admit workers, run the rounds (retrying a round that misses its quorum), checkpoint after
every round, and write the final model and the metrics."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from coordinator_service import checkpoint
from coordinator_service.observe import RunObserver
from coordinator_service.roster import HandshakeFailed, Roster
from coordinator_service.robust import Aggregation
from coordinator_service.server_opt import ServerOptimizer, ServerOptimizerConfig
from coordinator_service.rounds import (
    DEFAULT_MAX_UPDATE_RATIO,
    RoundFailed,
    RoundReport,
    RoundRunner,
    TransferSettings,
)
from coordinator_service.strategy import Strategy
from coordinator_service.worker_client import ClientSecurity, Expected, WorkerClient
from fedpi.data import Split
from fedpi.logs import is_console
from fedpi.models import parameter_count
from fedpi.task import Task, initial_model

log = structlog.get_logger()

__all__ = ["HandshakeFailed", "RunConfig", "RunStopped", "run"]
ROUND_MODELS = "rounds"  # --keep-round-models: rounds/round-N.pt beside the checkpoint


class RunStopped(Exception):
    """The run was asked to stop (RunConfig.stop) and did, after a completed and checkpointed round."""

    def __init__(self, round: int):
        super().__init__(f"stopped after round {round} on request; resumable from its checkpoint")
        self.round = round


@dataclass
class RunConfig:
    workers: list[tuple[str, str]]
    task: Task
    rounds: int
    output_dir: Path
    min_workers: int
    workers_dns: str | None = None  # re-resolved before every round, so returning pods are found
    init_seed: int = 0
    rpc_timeout: float = 30.0
    idle_timeout: float = 120.0
    round_timeout: float = 3600.0
    handshake_timeout: float = 10.0
    round_retries: int = 2
    retry_backoff: float = 5.0
    keepalive_seconds: float = 30.0
    resume: bool = False
    latest_link: Path | None = None  # a symlink pointed at output_dir when the run starts
    aggregation: Aggregation = Aggregation()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO
    federated_evaluation: bool = False  # each round's workers also evaluate the new model on their test splits
    transfer: TransferSettings = TransferSettings()
    security: ClientSecurity = ClientSecurity()
    keep_round_models: int = 0  # also keep the global model of the last N rounds (the control API's GetModel)
    stop: asyncio.Event | None = None  # set it to end the run after the current round


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _point(link: Path, target: Path) -> None:
    """Atomically make `link` a symlink to `target` (relative when they share a directory tree)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target.resolve(), link.parent.resolve()), tmp)
    os.replace(tmp, link)


def describe(cfg: RunConfig, strategy: Strategy) -> dict:
    """The run's configuration as plain values, for config.json and the report (no secrets: only whether TLS and a
    token are in use)."""
    settings = {k: v for k, v in vars(strategy).items() if isinstance(v, (int, float, str, bool))}
    return {
        "task": cfg.task.describe(), "model": cfg.task.architecture, "dataset": cfg.task.data_name, "rounds": cfg.rounds,
        "workers": cfg.workers_dns or [name for name, _ in cfg.workers], "min_workers": cfg.min_workers,
        "strategy": type(strategy).__name__, **settings, "aggregation": str(cfg.aggregation),
        "server_optimizer": asdict(cfg.server_optimizer), "max_update_ratio": cfg.max_update_ratio,
        "federated_evaluation": cfg.federated_evaluation, "chunk_size": cfg.transfer.chunk_size,
        "tls": cfg.security.tls, "token": cfg.security.token is not None,
    }


def _write_metrics(path: Path, events: list[dict]) -> None:
    _write_atomically(path, lambda p: p.write_text("".join(json.dumps(e) + "\n" for e in events)))


async def run(cfg: RunConfig, strategy: Strategy, test_split: Split | None,
              observer: RunObserver | None = None) -> list[RoundReport]:
    observer = observer or RunObserver()
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.latest_link is not None:
        _point(cfg.latest_link, cfg.output_dir)
    model = initial_model(cfg.task, seed=cfg.init_seed)
    architecture = cfg.task.architecture
    server_optimizer = ServerOptimizer(cfg.server_optimizer)
    metrics: list[dict] = []
    first_round = 1
    if cfg.resume and (ckpt := checkpoint.load(cfg.output_dir, architecture)) is not None:
        model.load_state_dict(ckpt.state_dict)
        if ckpt.server_optimizer:
            server_optimizer.load_state_dict(ckpt.server_optimizer)
        ckpt.restore_rng()
        metrics, first_round = ckpt.metrics, ckpt.round + 1
        log.info("training_resumed", from_round=ckpt.round, checkpoint=str(cfg.output_dir / checkpoint.CHECKPOINT_NAME))
    metrics_path = cfg.output_dir / "metrics.jsonl"
    _write_atomically(cfg.output_dir / "config.json",
                      lambda p: p.write_text(json.dumps(describe(cfg, strategy), indent=2) + "\n"))
    _write_metrics(metrics_path, metrics)  # drops a round that was logged but never checkpointed

    def make_client(name: str, address: str) -> WorkerClient:
        return WorkerClient(name, address, rpc_timeout=cfg.rpc_timeout, idle_timeout=cfg.idle_timeout,
                            keepalive_seconds=cfg.keepalive_seconds, security=cfg.security)

    roster = Roster(make_client, expected=Expected.of(cfg.task, model), workers=cfg.workers, dns=cfg.workers_dns,
                    handshake_timeout=cfg.handshake_timeout)
    runner = RoundRunner(model=model, architecture=architecture, strategy=strategy, test_split=test_split,
                         transfer=cfg.transfer, round_timeout=cfg.round_timeout, aggregation=cfg.aggregation,
                         max_update_ratio=cfg.max_update_ratio, server_optimizer=server_optimizer,
                         federated_evaluation=cfg.federated_evaluation, observer=observer,
                         evaluate=cfg.task.evaluate)
    reports: list[RoundReport] = []
    try:
        await roster.admit()
        if len(roster.active) < cfg.min_workers:
            raise HandshakeFailed(
                f"only {len(roster.active)} of {len(roster.clients)} workers passed the handshake, need "
                f"{cfg.min_workers} (--min-workers); the worker_handshake_failed and worker_unavailable events say why")
        log.info("training_started", task=cfg.task.describe(), model=architecture, parameters=parameter_count(model), rounds=cfg.rounds,
                 first_round=first_round, workers=[c.name for c in roster.active])
        observer.run_started(cfg.rounds, first_round, [c.name for c in roster.active])
        for server_round in range(first_round, cfg.rounds + 1):
            report = await _run_round_with_retries(cfg, roster, runner, server_round, observer)
            reports.append(report)
            event = report.as_event()
            metrics.append(event)
            checkpoint.save(cfg.output_dir, checkpoint.Checkpoint(
                round=server_round, model=architecture, state_dict=model.state_dict(), metrics=metrics,
                rng=checkpoint.Checkpoint.capture_rng(), server_optimizer=server_optimizer.state_dict()))
            with metrics_path.open("a") as f:
                f.write(json.dumps(event) + "\n")
            if cfg.keep_round_models:
                _keep_round_model(cfg.output_dir, server_round, model, cfg.keep_round_models)
            # On a terminal the per-worker table would drown the line; metrics.jsonl always has it.
            shown = {k: v for k, v in event.items() if k != "workers"} if is_console() else event
            log.info("round_finished", **shown, total_rounds=cfg.rounds)
            observer.round_finished(report)
            if cfg.stop is not None and cfg.stop.is_set() and server_round < cfg.rounds:
                log.info("training_stopped", round=server_round, rounds=cfg.rounds)
                raise RunStopped(server_round)
        model_path = cfg.output_dir / "model.pt"
        _write_atomically(model_path, lambda p: torch.save(model.state_dict(), p))
        log.info("training_finished", rounds=cfg.rounds, model_path=str(model_path), metrics_path=str(metrics_path),
                 test_accuracy=metrics[-1].get("test_accuracy") if metrics else None,
                 peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    finally:
        observer.run_finished()
        await roster.close()
    return reports


def _keep_round_model(directory: Path, server_round: int, model: torch.nn.Module, keep: int) -> None:
    rounds = directory / ROUND_MODELS
    rounds.mkdir(exist_ok=True)
    _write_atomically(rounds / f"round-{server_round}.pt", lambda p: torch.save(model.state_dict(), p))
    for old in sorted(rounds.glob("round-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-keep]:
        old.unlink()


async def _run_round_with_retries(cfg: RunConfig, roster: Roster, runner: RoundRunner, server_round: int,
                                  observer: RunObserver) -> RoundReport:
    for attempt in range(cfg.round_retries + 1):
        joined = await roster.admit()
        observer.workers_present([c.name for c in roster.active])
        if joined and (server_round > 1 or attempt):
            log.info("workers_rejoined", round=server_round, workers=[c.name for c in joined])
        try:
            report = await runner.run_round(server_round, roster.active, roster.index)
        except RoundFailed as exc:
            for failure in exc.failures:
                roster.drop(failure.worker)
            observer.round_failed(server_round, str(exc))
            if attempt == cfg.round_retries:
                raise
            log.warning("round_retrying", round=server_round, attempt=attempt + 1, reason=str(exc),
                        backoff_seconds=cfg.retry_backoff)
            await asyncio.sleep(cfg.retry_backoff * (2 ** attempt))
            continue
        for failure in report.failures:
            roster.drop(failure.worker)
        return report
    raise AssertionError("unreachable")
