"""A whole training run: admit workers, run the rounds (retrying a round that misses its quorum), checkpoint after
every round, and write the final model and the metrics."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from coordinator_service.engine import checkpoint
from coordinator_service.engine.buffered import AsyncSettings, BufferedRunner
from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.roster import HandshakeFailed, Roster
from coordinator_service.engine.rounds import (
    DEFAULT_MAX_UPDATE_RATIO,
    RoundFailed,
    RoundReport,
    RoundRunner,
    TransferSettings,
)
from coordinator_service.engine.secure import SecureSettings
from coordinator_service.engine.worker_client import Expected, WorkerClient
from coordinator_service.policy.privacy import Accountant, SampleAccountant
from coordinator_service.policy.rules import AggregationRule, WeightedMean
from coordinator_service.policy.server_opt import ServerOptimizer, ServerOptimizerConfig
from coordinator_service.policy.strategy import Strategy
from fedpi import durable
from fedpi.data import Split
from fedpi.logs import is_console
from fedpi.models import parameter_count
from fedpi.net.client import ClientSecurity
from fedpi.runtime import peak_rss_mb
from fedpi.task import Task, initial_model
from fedpi.weights import compression

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
    aggregation: AggregationRule = WeightedMean()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO
    federated_evaluation: bool = False  # each round's workers also evaluate the new model on their test splits
    # Evaluate round r's model before round r+1 starts, instead of while it trains (the rounds then take longer).
    sequential_evaluation: bool = False
    transfer: TransferSettings = TransferSettings()
    security: ClientSecurity = ClientSecurity()
    keep_round_models: int = 0  # also keep the global model of the last N rounds (the control API's GetModel)
    stop: asyncio.Event | None = None  # set it to end the run after the current round
    asynchronous: AsyncSettings | None = None  # --mode async: buffered asynchronous versions instead of rounds
    privacy: Accountant | None = None  # worker-level DP: epsilon after every round, and the budget
    dp_sgd: SampleAccountant | None = None  # DP-SGD on the workers: the budget foreseen per worker
    secure: SecureSettings | None = None  # secure aggregation: the coordinator sees only the sum of the updates


def _write_atomically(path: Path, write) -> None:
    durable.write_with(path, write)


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
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": cfg.task.describe(),
        "model": cfg.task.architecture,
        "dataset": cfg.task.data_name,
        "rounds": cfg.rounds,
        "workers": cfg.workers_dns or [name for name, _ in cfg.workers],
        "min_workers": cfg.min_workers,
        "strategy": type(strategy).__name__,
        **settings,
        "aggregation": str(cfg.aggregation),
        "server_optimizer": asdict(cfg.server_optimizer),
        "max_update_ratio": cfg.max_update_ratio,
        "federated_evaluation": cfg.federated_evaluation,
        "chunk_size": cfg.transfer.chunk_size,
        "compression": compression.NAMES[cfg.transfer.encoding],
        "global_model_encoding": compression.NAMES[cfg.transfer.model_encoding],
        "sequential_evaluation": cfg.sequential_evaluation,
        "tls": cfg.security.tls,
        "token": cfg.security.token is not None,
        "mode": "async" if cfg.asynchronous else "sync",
        **({"dp_" + k: v for k, v in asdict(cfg.privacy).items()} if cfg.privacy else {}),
        **(asdict(cfg.asynchronous) if cfg.asynchronous else {}),
        **({"secure_aggregation": asdict(cfg.secure)} if cfg.secure else {}),
    }


def _write_metrics(path: Path, events: list[dict]) -> None:
    _write_atomically(path, lambda f: f.write("".join(json.dumps(e) + "\n" for e in events).encode()))


async def run(
    cfg: RunConfig, strategy: Strategy, test_split: Split | None, observer: RunObserver | None = None
) -> list[RoundReport]:
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
            if cfg.server_optimizer.name == "auto":  # the workers go on with what auto chose
                strategy.feddyn_alpha = server_optimizer.worker_alpha
        cfg.aggregation.load_state_dict(ckpt.aggregation)
        ckpt.restore_rng()
        metrics, first_round = ckpt.metrics, ckpt.round + 1
        log.info("training_resumed", from_round=ckpt.round, checkpoint=str(cfg.output_dir / checkpoint.CHECKPOINT_NAME))
    metrics_path = cfg.output_dir / "metrics.jsonl"
    _write_atomically(
        cfg.output_dir / "config.json",
        lambda f: f.write((json.dumps(describe(cfg, strategy), indent=2) + "\n").encode()),
    )
    _write_metrics(metrics_path, metrics)  # drops a round that was logged but never checkpointed

    def make_client(name: str, address: str) -> WorkerClient:
        return WorkerClient(
            name,
            address,
            rpc_timeout=cfg.rpc_timeout,
            idle_timeout=cfg.idle_timeout,
            keepalive_seconds=cfg.keepalive_seconds,
            security=cfg.security,
        )

    roster = Roster(
        make_client,
        expected=Expected.of(cfg.task, model),
        workers=cfg.workers,
        dns=cfg.workers_dns,
        handshake_timeout=cfg.handshake_timeout,
    )
    runner = RoundRunner(
        model=model,
        architecture=architecture,
        strategy=strategy,
        transfer=cfg.transfer,
        round_timeout=cfg.round_timeout,
        aggregation=cfg.aggregation,
        max_update_ratio=cfg.max_update_ratio,
        server_optimizer=server_optimizer,
        federated_evaluation=cfg.federated_evaluation,
        observer=observer,
        secure=cfg.secure,
    )
    finisher = RoundFinisher(cfg, test_split, observer, metrics, metrics_path, server_optimizer)
    reports: list[RoundReport] = []
    try:
        await roster.admit()
        observer.workers_away(roster.away)
        if len(roster.active) < cfg.min_workers:
            raise HandshakeFailed(
                f"only {len(roster.active)} of {len(roster.clients)} workers passed the handshake, need "
                f"{cfg.min_workers} (--min-workers); the worker_handshake_failed and worker_unavailable events say why"
            )
        log.info(
            "training_started",
            task=cfg.task.describe(),
            model=architecture,
            parameters=parameter_count(model),
            rounds=cfg.rounds,
            first_round=first_round,
            workers=[c.name for c in roster.active],
        )
        observer.run_started(cfg.rounds, first_round, [c.name for c in roster.active])
        if cfg.asynchronous is not None:
            await _run_versions(cfg, cfg.asynchronous, roster, runner, finisher, reports, first_round - 1)
        else:
            await _run_rounds(cfg, roster, runner, finisher, reports, first_round, observer)
        await finisher.drain()
        model_path = cfg.output_dir / "model.pt"
        _write_atomically(model_path, lambda p: torch.save(model.state_dict(), p))
        log.info(
            "training_finished",
            rounds=cfg.rounds,
            model_path=str(model_path),
            metrics_path=str(metrics_path),
            test_accuracy=metrics[-1].get("test_accuracy") if metrics else None,
            peak_rss_mb=round(peak_rss_mb(), 1),
        )
    except BaseException:
        await finisher.settle()  # a round that completed before the failure is still checkpointed and logged
        raise
    finally:
        observer.run_finished()
        await roster.close()
    return reports


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
    except (AttributeError, OSError):  # elsewhere, or not allowed: same priority as the round
        pass


@dataclass
class _Completed:
    """A round whose aggregate is installed, and the state a checkpoint of it needs, taken as the round ended."""

    report: RoundReport
    model: torch.nn.Module  # the global model after the round (a copy when the next round may change the live one)
    rng: dict
    server_optimizer: dict
    aggregation: dict


class RoundFinisher:
    """Evaluates each round's global model, then checkpoints it, writes its metrics line, logs `round_finished` and
    tells the observer, strictly in round order.

    By default this happens while the next round trains (the coordinator is idle then), on a copy of the model: the
    round's wall time holds transfers and aggregation only. At most one round waits, so memory holds at most one
    extra model. With `sequential_evaluation` each round is finished before the next one starts."""

    def __init__(
        self,
        cfg: RunConfig,
        test_split: Split | None,
        observer: RunObserver,
        metrics: list[dict],
        metrics_path: Path,
        server_optimizer: ServerOptimizer,
    ):
        self.cfg = cfg
        self.test_split = test_split
        self.observer = observer
        self.metrics = metrics
        self.metrics_path = metrics_path
        self.server_optimizer = server_optimizer
        self._pending: asyncio.Task | None = None
        self._copy: torch.nn.Module | None = None
        # Evaluation gets a thread of its own at a lower CPU priority: beside a round, the round comes first.
        self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="fedpi-evaluation", initializer=_lower_priority)

    async def submit(self, report: RoundReport, model: torch.nn.Module) -> None:
        """Finish the previous round if it still is being evaluated, then start finishing this one."""
        await self.drain()
        sequential = self.cfg.sequential_evaluation
        completed = _Completed(
            report,
            model if sequential else self._copy_of(model),
            checkpoint.Checkpoint.capture_rng(),
            copy.deepcopy(self.server_optimizer.state_dict()),
            copy.deepcopy(self.cfg.aggregation.state_dict()),
        )
        self._pending = asyncio.create_task(self._finish(completed))
        if sequential:
            await self.drain()

    def _copy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as it is now, in the copy the last round used (finished by now): no fresh allocation a round."""
        if self._copy is None:
            self._copy = copy.deepcopy(model)
        else:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.state_dict().values(), model.state_dict().values()):
                    mine.copy_(theirs)
        return self._copy

    async def drain(self) -> None:
        """Wait until every submitted round is finished; raises what finishing it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def settle(self) -> None:
        """Like drain, for when the run is failing already: a failure here is logged, not raised over the first."""
        try:
            await self.drain()
        except Exception as exc:  # noqa: BLE001
            log.error("round_not_finished", reason=f"{type(exc).__name__}: {exc}")

    async def _finish(self, done: _Completed) -> None:
        report, cfg = done.report, self.cfg
        if self.test_split is not None:
            t = time.perf_counter()
            report.test_loss, report.test_accuracy = await asyncio.get_running_loop().run_in_executor(
                self._evaluator, cfg.task.evaluate, done.model, self.test_split
            )
            report.evaluation_seconds = time.perf_counter() - t
        event = report.as_event()
        self.metrics.append(event)
        await asyncio.to_thread(self._write, done, event)
        # On a terminal the per-worker table would drown the line; metrics.jsonl always has it.
        shown = {k: v for k, v in event.items() if k != "workers"} if is_console() else event
        log.info("round_finished", **shown, total_rounds=cfg.rounds)
        self.observer.round_finished(report)

    def _write(self, done: _Completed, event: dict) -> None:
        """The checkpoint (fsync'd), the metrics line, and the round's model if asked: off the event loop."""
        cfg, state = self.cfg, done.model.state_dict()
        checkpoint.save(
            cfg.output_dir,
            checkpoint.Checkpoint(
                round=done.report.round,
                model=cfg.task.architecture,
                state_dict=state,
                metrics=list(self.metrics),
                rng=done.rng,
                server_optimizer=done.server_optimizer,
                aggregation=done.aggregation,
            ),
        )
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if cfg.keep_round_models:
            _keep_round_model(cfg.output_dir, done.report.round, done.model, cfg.keep_round_models)


def _keep_round_model(directory: Path, server_round: int, model: torch.nn.Module, keep: int) -> None:
    rounds = directory / ROUND_MODELS
    rounds.mkdir(exist_ok=True)
    _write_atomically(rounds / f"round-{server_round}.pt", lambda p: torch.save(model.state_dict(), p))
    for old in sorted(rounds.glob("round-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-keep]:
        old.unlink()


async def _run_rounds(
    cfg: RunConfig,
    roster: Roster,
    runner: RoundRunner,
    finisher: RoundFinisher,
    reports: list[RoundReport],
    first_round: int,
    observer: RunObserver,
) -> None:
    for server_round in range(first_round, cfg.rounds + 1):
        if not _within_budget(cfg, roster, server_round):
            return
        report = await _run_round_with_retries(cfg, roster, runner, server_round, observer)
        if cfg.privacy is not None:
            report.dp_epsilon = cfg.privacy.epsilon(server_round)
            if cfg.secure is not None:  # distributed DP: a guarantee against the coordinator too
                report.dp_epsilon_coordinator = cfg.privacy.unsampled(server_round)
        reports.append(report)
        await finisher.submit(report, runner.model)
        if cfg.stop is not None and cfg.stop.is_set() and server_round < cfg.rounds:
            await finisher.drain()
            log.info("training_stopped", round=server_round, rounds=cfg.rounds)
            raise RunStopped(server_round)


def _within_budget(cfg: RunConfig, roster: Roster, server_round: int) -> bool:
    """Whether round `server_round` keeps every privacy guarantee within --dp-target-epsilon; logs the one it would
    break: worker-level DP, or DP-SGD on the worker whose data it would take furthest."""
    over: list[tuple[str, float, float, float]] = []  # guarantee, epsilon so far, after the round, target
    if cfg.privacy is not None and not cfg.privacy.allows(server_round):
        eps = cfg.privacy.epsilon
        over.append(("worker-level", eps(server_round - 1), eps(server_round), cfg.privacy.target_epsilon))
    sgd = cfg.dp_sgd
    shards = {c.name: c.info.train_samples for c in roster.active if c.info is not None}
    if sgd is not None and shards and not sgd.allows(server_round, list(shards.values())):
        worker = max(shards, key=lambda name: sgd.epsilon(server_round, shards[name]))
        before, after = sgd.epsilon(server_round - 1, shards[worker]), sgd.epsilon(server_round, shards[worker])
        over.append((f"DP-SGD on {worker}", before, after, sgd.target_epsilon))
    for guarantee, epsilon, would_be, target in over:
        log.warning(
            "privacy_budget_reached",
            round=server_round,
            guarantee=guarantee,
            epsilon=round(epsilon, 4),
            would_be=round(would_be, 4),
            target_epsilon=target,
        )
    return not over


async def _run_versions(
    cfg: RunConfig,
    settings: AsyncSettings,
    roster: Roster,
    runner: RoundRunner,
    finisher: RoundFinisher,
    reports: list[RoundReport],
    first_version: int,
) -> None:
    """--mode async: server versions until cfg.rounds, each finished (evaluated, checkpointed, logged) as a round."""

    async def finish(report: RoundReport, model: torch.nn.Module) -> None:
        reports.append(report)
        await finisher.submit(report, model)

    buffered = BufferedRunner(
        runner,
        roster,
        settings,
        finish,
        stall_timeout=cfg.round_timeout,
        retry_backoff=cfg.retry_backoff,
        stop=cfg.stop,
    )
    try:
        made = await buffered.run(first_version, cfg.rounds)
    finally:
        log.info("workers_idle", idle_fraction=buffered.busy.idle_fractions(), version=buffered.version)
    if made < cfg.rounds:
        await finisher.drain()
        log.info("training_stopped", round=made, rounds=cfg.rounds)
        raise RunStopped(made)


async def _run_round_with_retries(
    cfg: RunConfig, roster: Roster, runner: RoundRunner, server_round: int, observer: RunObserver
) -> RoundReport:
    for attempt in range(cfg.round_retries + 1):
        joined = await roster.admit()
        observer.workers_present([c.name for c in roster.active])
        observer.workers_away(roster.away)
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
            log.warning(
                "round_retrying",
                round=server_round,
                attempt=attempt + 1,
                reason=str(exc),
                backoff_seconds=cfg.retry_backoff,
            )
            await asyncio.sleep(cfg.retry_backoff * (2**attempt))
            continue
        for failure in report.failures:
            roster.drop(failure.worker)
        report.absent = roster.away + report.absent  # and those the runner skipped (a board short of memory)
        return report
    raise AssertionError("unreachable")
