"""A run from its three parts: what it trains and on which workers (a RunTarget), what it tunes (RunSettings) and
the server's own side (a RunPlace: where results go, how workers are reached, where data lives). `train` and `demo`
build them from flags; the control API from a RunSpec and the server's flags. Neither goes through the other.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path

from coordinator_service.control.runspec import RunTarget  # noqa: F401 - also for callers
from coordinator_service.engine.buffered import AsyncSettings
from coordinator_service.engine.discovery import discover
from coordinator_service.engine.observer import RunObserver
from coordinator_service.engine.rounds import TransferSettings
from coordinator_service.engine.secure import SecureSettings
from coordinator_service.engine.training import RunConfig, run
from coordinator_service.policy.privacy import Accountant, AdaptiveClip, GaussianMean, SampleAccountant
from coordinator_service.policy.rules import AggregationRule
from coordinator_service.policy.server_opt import ServerOptimizerConfig
from coordinator_service.policy.strategy import STRATEGIES, FedAvg
from coordinator_service.settings import RunSettings
from fedpi.net.client import ClientSecurity
from fedpi.runtime import read_secret
from fedpi.task import Task, build_task
from fedpi.weights import compression
from generated.fedpi.v1 import worker_pb2 as pb

COMPRESSION = {name: encoding for encoding, name in compression.NAMES.items()}


@dataclass(frozen=True)
class RunPlace:
    """The server's side of a run: never part of a request."""

    output_dir: Path
    security: ClientSecurity = field(default_factory=ClientSecurity)
    data_dir: str = "data"
    download: bool = True
    default_dataset: str = "auto"
    latest_link: Path | None = None
    keep_round_models: int = 0
    discovery_timeout: float = 600.0  # seconds to wait for workers_dns to name expect_workers workers


def client_security(
    token_file: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> ClientSecurity:
    """How the coordinator reaches workers, from the files the operator named (--token-file, --tls-*)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if tls_cert and not tls_ca:
        raise ValueError("mutual TLS (--tls-cert) needs --tls-ca to verify the workers")
    path = lambda value: Path(value) if value else None  # noqa: E731
    return ClientSecurity(
        token=read_secret(token_file, "--token-file") if token_file else None,
        ca_file=path(tls_ca),
        cert_file=path(tls_cert),
        key_file=path(tls_key),
        server_name=tls_server_name,
    )


def make_task(target: RunTarget, place: RunPlace) -> Task:
    return build_task(
        target.task,
        data_dir=place.data_dir,
        download=place.download,
        model=target.model or None,
        dataset=target.dataset or place.default_dataset,
        given_dataset=target.dataset or None,
    )


def min_workers(settings: RunSettings, n_workers: int) -> int:
    """The quorum: min_workers, or a majority of the workers that train in a round."""
    sampling = settings.sampling
    per_round = sample_size(settings, n_workers)
    if sampling.min_workers > per_round:
        raise ValueError(
            f"min_workers {sampling.min_workers} can never be met: only {per_round} of {n_workers} "
            f"workers train in a round (fraction / workers_per_round)"
        )
    if settings.aggregation.rule.minimum_workers() > per_round:
        raise ValueError(
            f"aggregation {settings.aggregation.aggregation} needs at least "
            f"{settings.aggregation.rule.minimum_workers()} workers a round; {per_round} train in one"
        )
    return sampling.min_workers or math.ceil((per_round + 1) / 2)


def strategy(settings: RunSettings, n_workers: int) -> FedAvg:
    t = settings.training
    return STRATEGIES[settings.strategy_name](
        local_batches=t.local_batches,
        local_epochs=t.local_epochs,
        local_seconds=t.local_seconds,
        batch_size=t.batch_size,
        learning_rate=t.lr,
        momentum=t.momentum,
        seed=t.seed,
        min_workers=min_workers(settings, n_workers),
        weighted=not settings.aggregation.unweighted and not settings.privacy.on,
        lr_schedule=t.effective_lr_schedule,
        lr_decay=t.lr_decay,
        rounds=settings.rounds,
        proximal_mu=t.proximal_mu,
        not_true_distillation=t.not_true_distillation,
        fraction=settings.sampling.fraction,
        workers_per_round=settings.sampling.workers_per_round,
        dp_sgd_noise_multiplier=settings.privacy.dp_sgd_noise_multiplier,
        dp_sgd_max_grad_norm=settings.privacy.dp_sgd_max_grad_norm,
        dp_delta=settings.privacy.dp_delta,
        feddyn_alpha=settings.server.feddyn_alpha if settings.server.server_optimizer == "feddyn" else 0.0,
    )


def server_optimizer(settings: RunSettings) -> ServerOptimizerConfig:
    s = settings.server
    return ServerOptimizerConfig(
        name=settings.server_optimizer_name,
        lr=s.effective_lr,
        beta1=s.server_momentum,
        beta2=s.server_beta2,
        tau=s.server_tau,
        alpha=s.feddyn_alpha,
    )


def transfer(settings: RunSettings) -> TransferSettings:
    t = settings.transfer
    encoding = COMPRESSION[t.compression]
    model_encoding = encoding if t.compression == "zlib" or t.compress_global_model else pb.CHUNK_ENCODING_RAW
    return TransferSettings(chunk_size=t.chunk_size, encoding=encoding, model_encoding=model_encoding)


def asynchronous(settings: RunSettings, n_workers: int) -> AsyncSettings | None:
    a = settings.aggregation
    if a.mode != "async":
        return None
    return AsyncSettings(
        buffer_size=a.buffer_size or math.ceil(n_workers / 2),
        max_staleness=a.max_staleness,
        staleness_exponent=a.staleness_exponent,
    )


def sample_size(settings: RunSettings, n_workers: int) -> int:
    """How many of `n_workers` train in a round."""
    sampling = settings.sampling
    return FedAvg(fraction=sampling.fraction, workers_per_round=sampling.workers_per_round).sample_size(n_workers)


def aggregation(settings: RunSettings, n_workers: int) -> AggregationRule:
    """The rule the settings name, or with worker-level DP its Gaussian mean."""
    p = settings.privacy
    if not p.on:
        return settings.aggregation.rule
    per_round = sample_size(settings, n_workers)
    adaptive = None
    if p.dp_clip_quantile:
        adaptive = AdaptiveClip(p.dp_clip_norm, p.dp_clip_quantile, p.dp_clip_lr, p.count_stddev(per_round))
    return GaussianMean(p.dp_clip_norm, p.dp_noise_multiplier, per_round, adaptive)


def accountant(settings: RunSettings, n_workers: int) -> Accountant | None:
    p = settings.privacy
    if not p.on:
        return None
    rate = sample_size(settings, n_workers) / max(n_workers, 1)
    return Accountant(p.dp_noise_multiplier, rate, p.dp_delta, p.dp_target_epsilon)


def dp_sgd(settings: RunSettings) -> SampleAccountant | None:
    p, t = settings.privacy, settings.training
    if not p.dp_sgd:
        return None
    return SampleAccountant(
        p.dp_sgd_noise_multiplier, p.dp_delta, t.batch_size, t.local_batches, t.local_epochs, p.dp_target_epsilon
    )


def secure(settings: RunSettings) -> SecureSettings | None:
    p = settings.privacy
    if not p.secure_aggregation:
        return None
    return SecureSettings(
        neighbours=p.secagg_neighbours,
        threshold=p.secagg_threshold,
        clip=p.secagg_clip,
        chunk_bytes=settings.transfer.chunk_size // 4 * 4,
    )


def run_config(
    settings: RunSettings,
    place: RunPlace,
    workers: list[tuple[str, str]],
    task: Task,
    workers_dns: str | None = None,
    resume: bool = False,
    stop: asyncio.Event | None = None,
) -> RunConfig:
    t = settings.timeouts
    return RunConfig(
        workers=workers,
        task=task,
        rounds=settings.rounds,
        output_dir=place.output_dir,
        min_workers=min_workers(settings, len(workers)),
        workers_dns=workers_dns,
        init_seed=settings.training.seed,
        rpc_timeout=t.rpc_timeout,
        idle_timeout=t.idle_timeout,
        round_timeout=t.round_timeout,
        handshake_timeout=t.handshake_timeout,
        round_retries=t.round_retries,
        retry_backoff=t.retry_backoff,
        keepalive_seconds=t.keepalive,
        server_optimizer=server_optimizer(settings),
        federated_evaluation=settings.evaluation.federated_evaluation,
        sequential_evaluation=settings.evaluation.sequential_evaluation,
        resume=resume,
        latest_link=place.latest_link,
        aggregation=aggregation(settings, len(workers)),
        max_update_ratio=settings.aggregation.max_update_ratio,
        transfer=transfer(settings),
        security=place.security,
        keep_round_models=place.keep_round_models,
        stop=stop,
        asynchronous=asynchronous(settings, len(workers)),
        privacy=accountant(settings, len(workers)),
        dp_sgd=dp_sgd(settings),
        secure=secure(settings),
    )


async def workers_of(target: RunTarget, place: RunPlace) -> list[tuple[str, str]]:
    """The target's named workers, or those its DNS name resolves to once it names enough of them."""
    if target.workers:
        return [(name, str(address)) for name, address in target.workers]
    return await discover(str(target.workers_dns), target.expect_workers, place.discovery_timeout)


async def train(
    target: RunTarget,
    settings: RunSettings,
    place: RunPlace,
    observer: RunObserver,
    stop: asyncio.Event | None = None,
    resume: bool = False,
) -> None:
    """A whole run on running workers: `fedpi train`'s, and every run of the control API."""
    workers = await workers_of(target, place)
    # Off the event loop: a service keeps answering while a task loads its data.
    task = await asyncio.to_thread(make_task, target, place)
    test = await asyncio.to_thread(task.test_data)
    dns = str(target.workers_dns) if target.workers_dns else None
    await run(
        run_config(settings, place, workers, task, dns, resume, stop), strategy(settings, len(workers)), test, observer
    )
