"""fedpi coordinator.

  python -m coordinator_service train --workers alice=10.0.0.11:50051,bob=10.0.0.12:50051 --rounds 10
  python -m coordinator_service demo --rounds 5       # three local workers on 127.0.0.1, then the same training
  python -m coordinator_service demo --task breast-cancer   # another task (`tasks` lists the installed ones)
  python -m coordinator_service tasks
  python -m coordinator_service serve --state-dir results   # a long-running coordinator: runs through its gRPC API
"""

from __future__ import annotations

# Before torch is imported: on a CPU this torch cannot run, say so in one line instead of dying with SIGILL.
from fedpi import preflight

preflight.run_if_asked()

import argparse
import asyncio
import math
import os
import sys
from pathlib import Path

import structlog
import torch

from coordinator_service.local import demo_cluster
from coordinator_service.metrics import PrometheusObserver
from coordinator_service.observe import Observers, RunObserver
from coordinator_service.progress import LiveProgress
from coordinator_service.robust import Aggregation, parse_aggregation
from coordinator_service.rounds import DEFAULT_MAX_UPDATE_RATIO, RoundFailed, TransferSettings
from coordinator_service.server_opt import SERVER_OPTIMIZERS, ServerOptimizerConfig
from coordinator_service.strategy import STRATEGIES, FedAvg
from coordinator_service.training import HandshakeFailed, RunConfig, run
from coordinator_service.checkpoint import CheckpointMismatch
from coordinator_service.worker_client import ClientSecurity, DiscoveryFailed, discover, parse_workers
from fedpi import data as datasets
from fedpi import task as tasks
from fedpi import compression
from fedpi.cli import (
    add_task_arguments,
    apply_env_defaults,
    env_name,
    freeze_startup_objects,
    make_task,
    read_secret,
)
from fedpi.mnist_task import MnistTask
from fedpi.logs import LOG_FORMATS, configure_logging, wants_console
from generated.fedpi.v1 import worker_pb2 as pb

log = structlog.get_logger()
COMPRESSION = {name: encoding for encoding, name in compression.NAMES.items()}

# Starting configurations. `default` holds the flags' own defaults, chosen from `make bench-learning` (README:
# Learning); `seed` is fedpi's first configuration (the reference's plain SGD), kept so its figures can be reproduced.
PRESETS: dict[str, dict] = {
    "default": {},
    "seed": {"lr": 0.01, "momentum": 0.0, "local_batches": 50, "batch_size": 64, "server_optimizer": "fedavg"},
}


WORKER_SECURITY_FLAGS = ("--token-file", "--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name")


def _worker_security_arguments(g) -> None:
    """How the coordinator proves itself to workers and checks them: `train`'s, `demo`'s and `serve`'s."""
    g.add_argument("--token-file", help="file holding the bearer token workers require")
    g.add_argument("--tls-ca", help="CA certificate to verify workers with; turns TLS on")
    g.add_argument("--tls-cert", help="client certificate, for workers that require mutual TLS")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", help="name on the workers' certificates when dialling them by IP address")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="a starting configuration that flags and FEDPI_* variables override: default (measured, "
                        "README: Learning) or seed (fedpi's first configuration: plain SGD, lr 0.01)")
    p.add_argument("--rounds", type=int, default=10)
    # The coordinator evaluates on the task's held-out test set; workers load their own shards.
    add_task_arguments(p, default_dataset="auto")
    g = p.add_argument_group("local training (sent to every worker each round)")
    g.add_argument("--local-batches", type=int, default=50, help="batches per worker per round")
    g.add_argument("--local-epochs", type=int, default=0, help="epochs per round instead of --local-batches")
    g.add_argument("--local-seconds", type=float, default=0.0,
                   help="instead of --local-batches: every worker trains for this many seconds (mixed clusters; "
                        "aggregated with FedNova unless --strategy says otherwise)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the workers")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the workers (fresh each round)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initial model and every worker's batch order")
    g.add_argument("--unweighted", action="store_true", help="plain mean instead of weighting by samples")
    g.add_argument("--strategy", choices=("auto", *STRATEGIES), default="auto",
                   help="fedavg, or fednova (normalises updates by their local steps); auto: fednova with "
                        "--local-seconds, else fedavg")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="share of the present workers that train each round (a seeded choice per round)")
    g.add_argument("--workers-per-round", type=int, default=0,
                   help="instead of --fraction: how many workers train each round")
    g.add_argument("--federated-evaluation", action="store_true",
                   help="after every round, each worker also evaluates the new model on its local test split")
    g.add_argument("--sequential-evaluation", action="store_true",
                   help="evaluate each round's model before the next round starts, not while it trains")
    g.add_argument("--aggregation", type=parse_aggregation, default=Aggregation(),
                   help="fedavg | median | trimmed-mean[:k] | clipped[:norm] (README: Robust aggregation)")
    g.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS, default="fedavg",
                   help="how the aggregate becomes the next global model (README: Server optimizers)")
    g.add_argument("--server-lr", type=float, default=None,
                   help="server learning rate (default: 1.0 for fedavgm, 0.01 for the adaptive ones)")
    g.add_argument("--server-momentum", type=float, default=0.9, help="server beta1 (fedavgm's momentum)")
    g.add_argument("--server-beta2", type=float, default=0.99, help="second-moment decay of fedadam / fedyogi")
    g.add_argument("--server-tau", type=float, default=1e-3, help="adaptivity of fedadam / fedyogi / fedadagrad")
    g.add_argument("--proximal-mu", type=float, default=0.0,
                   help="FedProx: workers add mu/2 * ||w - w_global||^2 to their loss (0: plain FedAvg)")
    g.add_argument("--lr-decay", type=float, default=1.0,
                   help="the local learning rate of round r is --lr x this^(r-1)")
    g.add_argument("--max-update-ratio", type=float, default=DEFAULT_MAX_UPDATE_RATIO,
                   help="refuse an update further from the global model than this many times the model's L2 norm")
    g = p.add_argument_group("rounds and transport")
    g.add_argument("--min-workers", type=int, default=0,
                   help="quorum: a round counts if this many workers finish it (default: a majority)")
    g.add_argument("--round-timeout", type=float, default=3600.0, help="seconds a worker may take for one round")
    g.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds without training progress before a worker counts as hung")
    g.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of short calls")
    g.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="seconds an absent worker gets to answer before each round (dropped workers rejoin this way)")
    g.add_argument("--round-retries", type=int, default=2,
                   help="times a round that misses its quorum is tried again (with backoff) before giving up")
    g.add_argument("--retry-backoff", type=float, default=5.0,
                   help="seconds before the first retry of a round; doubles with each further retry")
    g.add_argument("--keepalive", type=float, default=30.0, help="seconds between keepalive pings on quiet connections")
    g.add_argument("--resume", action="store_true",
                   help="continue from checkpoint.pt in --output-dir after the last completed round")
    g.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per weight chunk")
    g.add_argument("--compression", choices=list(COMPRESSION), default="none",
                   help="how workers send their updates: zlib (lossless, the global model too), fp16 / bf16 (half "
                        "the bytes), int8 (deltas with error feedback, a quarter); README: Compression")
    g.add_argument("--compress-global-model", action="store_true",
                   help="with fp16 / bf16: send the global model that way too (otherwise it goes down exact)")
    g.add_argument("--encoding", choices=("raw", "zlib"), help=argparse.SUPPRESS)  # before --compression
    p.add_argument("--output-dir", default="runs/latest",
                   help="model.pt, metrics.jsonl and checkpoint.pt (after every round) go here")
    p.add_argument("--latest-link", help="also point this symlink at --output-dir (e.g. results/latest)")
    p.add_argument("--keep-round-models", type=int, default=0,
                   help="also keep the global model of the last N rounds in --output-dir/rounds/")
    _worker_security_arguments(p.add_argument_group("security (see README: Threat model)"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics at http://--metrics-host:PORT/metrics while training (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address the metrics server listens on")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")


def _preset_named(argv: list[str]) -> str:
    """The --preset of a command line (or FEDPI_PRESET), read before parsing so that it can set defaults."""
    name = os.environ.get(env_name("--preset"), "default")
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
    return name


def parse_args(argv: list[str] | None = None, prog: str = "python -m coordinator_service") -> argparse.Namespace:
    """`prog`: how the user called this (the `fedpi` command passes its own name), for --help and errors."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on running workers")
    train.add_argument("--workers", help="NAME=HOST:PORT,... (a bare HOST:PORT is named after itself)")
    train.add_argument("--workers-dns", help="instead of --workers: HOST:PORT whose DNS name resolves to every worker "
                                             "(a Kubernetes headless Service)")
    train.add_argument("--expect-workers", type=int, default=0, help="with --workers-dns: how many to wait for")
    train.add_argument("--discovery-timeout", type=float, default=600.0,
                       help="with --workers-dns: seconds to wait for --expect-workers to appear")
    _common(train)
    demo = sub.add_parser("demo", help="start local workers on 127.0.0.1 and train on them")
    demo.add_argument("--local-workers", type=int, default=3, help="how many local workers to start")
    demo.add_argument("--worker-threads", type=int, default=1, help="torch threads per local worker")
    demo.add_argument("--startup-timeout", type=float, default=120.0,
                      help="seconds the local workers get to start serving (more on slow or emulated CPUs)")
    demo.add_argument("--partition-scheme", choices=datasets.PARTITION_SCHEMES, default="iid")
    demo.add_argument("--partition-alpha", type=float, default=datasets.DEFAULT_DIRICHLET_ALPHA,
                      help="with --partition-scheme dirichlet: the concentration (0.1: few classes per worker)")
    _common(demo)
    sub.add_parser("tasks", help="list the installed tasks (the fedpi.tasks entry-point group)")
    _serve_arguments(sub.add_parser("serve", help="serve the fedpi.v1.Coordinator control API: start, watch, stop "
                                                  "and resume runs, fetch their models"))
    argv = sys.argv[1:] if argv is None else argv
    preset = PRESETS.get(_preset_named(argv))  # an unknown name is reported by the parser itself
    if preset is not None:
        train.set_defaults(**preset)
        demo.set_defaults(**preset)
    apply_env_defaults(p)
    return p.parse_args(argv)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0", help="address the control API listens on")
    p.add_argument("--port", type=int, default=50050)
    p.add_argument("--state-dir", default="coordinator-state",
                   help="every run's record, events, metrics, checkpoints and models go under STATE_DIR/runs/")
    p.add_argument("--keep-round-models", type=int, default=5,
                   help="keep the global model of each run's last N rounds (GetModel with a round)")
    # Defaults of every run (a RunSpec's task, model and dataset win); where runs read their test data.
    add_task_arguments(p, default_dataset="auto")
    g = p.add_argument_group("the control API's own security (operators)")
    g.add_argument("--api-token-file", help="operators must send this bearer token (file contents)")
    g.add_argument("--api-tls-cert", help="serve the API over TLS with this certificate")
    g.add_argument("--api-tls-key", help="private key of --api-tls-cert")
    g.add_argument("--api-client-ca", help="require operator certificates signed by this CA (mutual TLS)")
    g.add_argument("--api-client-identity", help="with mutual TLS: the only certificate name allowed to call")
    _worker_security_arguments(
        p.add_argument_group("how runs reach the workers (the same flags as `train`; never part of a RunSpec)"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics of the runs (0: off)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")


def _serve(args: argparse.Namespace) -> int:
    from coordinator_service.runs import RunStore
    from coordinator_service.service import RunManager, serve
    from fedpi.auth import ServerSecurity

    configure_logging(args.log_format)
    server_argv = ["--task", args.task, "--data-dir", args.data_dir, *(["--no-download"] if args.no_download else [])]
    for flag in ("--model", "--dataset", *WORKER_SECURITY_FLAGS):
        if value := getattr(args, flag[2:].replace("-", "_")):
            server_argv += [flag, value]
    path = lambda value: Path(value) if value else None  # noqa: E731
    try:
        if bool(args.api_tls_cert) != bool(args.api_tls_key):
            raise ValueError("--api-tls-cert and --api-tls-key go together")
        if (args.api_client_ca or args.api_client_identity) and not args.api_tls_cert:
            raise ValueError("mutual TLS (--api-client-ca, --api-client-identity) needs --api-tls-cert and --api-tls-key")
        security = ServerSecurity(
            token=read_secret(args.api_token_file, "--api-token-file") if args.api_token_file else None,
            cert_file=path(args.api_tls_cert), key_file=path(args.api_tls_key),
            client_ca_file=path(args.api_client_ca), client_identity=args.api_client_identity,
            client_role="an operator", server_role="coordinator", token_flag="fedpi runs --token-file")
        observers: list[RunObserver] = []
        if args.metrics_port:
            metrics = PrometheusObserver()
            metrics.serve(args.metrics_port, args.metrics_host)
            observers.append(metrics)
        store = RunStore(Path(args.state_dir))
    except (ValueError, OSError) as exc:
        log.error("coordinator_failed_to_start", reason=str(exc))
        return 2

    async def main_loop() -> None:
        manager = RunManager(store, parse_args, train, server_argv, args.keep_round_models, observers)
        await serve(manager, f"{args.host}:{args.port}", security)

    asyncio.run(main_loop())
    return 0


def _strategy_name(args: argparse.Namespace) -> str:
    if args.strategy == "auto":
        return "fednova" if args.local_seconds else "fedavg"
    return args.strategy


def _strategy(args: argparse.Namespace, n_workers: int) -> FedAvg:
    name = _strategy_name(args)
    if name == "fednova" and args.aggregation.coordinate_wise:
        raise ValueError(f"--strategy fednova weighs every update by its local steps; --aggregation "
                         f"{args.aggregation} ignores weights: use fedavg or clipped")
    return STRATEGIES[name](
        local_batches=args.local_batches, local_epochs=args.local_epochs, local_seconds=args.local_seconds,
        batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum, seed=args.seed,
        min_workers=_min_workers(args, n_workers), weighted=not args.unweighted, lr_decay=args.lr_decay,
        proximal_mu=args.proximal_mu, fraction=args.fraction, workers_per_round=args.workers_per_round)


def _server_optimizer(args: argparse.Namespace) -> ServerOptimizerConfig:
    default_lr = 1.0 if args.server_optimizer in ("fedavg", "fedavgm") else 0.01
    return ServerOptimizerConfig(name=args.server_optimizer, lr=args.server_lr or default_lr,
                                 beta1=args.server_momentum, beta2=args.server_beta2, tau=args.server_tau)


def _min_workers(args: argparse.Namespace, n_workers: int) -> int:
    """The quorum: --min-workers, or a majority of the workers that train in a round."""
    per_round = FedAvg(fraction=args.fraction, workers_per_round=args.workers_per_round).sample_size(n_workers)
    if args.min_workers > per_round:
        raise ValueError(f"--min-workers {args.min_workers} can never be met: only {per_round} of {n_workers} "
                         f"workers train in a round (--fraction / --workers-per-round)")
    return args.min_workers or math.ceil((per_round + 1) / 2)


def client_security(args: argparse.Namespace) -> ClientSecurity:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ValueError("mutual TLS (--tls-cert) needs --tls-ca to verify the workers")
    token = read_secret(args.token_file, "--token-file") if args.token_file else None
    if token and not args.tls_ca:
        log.warning("token_sent_in_clear", hint="without --tls-ca the bearer token crosses the network unencrypted")
    path = lambda value: Path(value) if value else None  # noqa: E731
    return ClientSecurity(token=token, ca_file=path(args.tls_ca), cert_file=path(args.tls_cert),
                          key_file=path(args.tls_key), server_name=args.tls_server_name)


def _run_config(args: argparse.Namespace, workers: list[tuple[str, str]], task: tasks.Task,
                workers_dns: str | None = None, stop: asyncio.Event | None = None) -> RunConfig:
    return RunConfig(
        workers=workers, task=task, rounds=args.rounds, output_dir=Path(args.output_dir),
        min_workers=_min_workers(args, len(workers)), workers_dns=workers_dns,
        init_seed=args.seed, rpc_timeout=args.rpc_timeout, idle_timeout=args.idle_timeout,
        round_timeout=args.round_timeout, handshake_timeout=args.handshake_timeout,
        round_retries=args.round_retries, retry_backoff=args.retry_backoff, keepalive_seconds=args.keepalive,
        server_optimizer=_server_optimizer(args), federated_evaluation=args.federated_evaluation,
        sequential_evaluation=args.sequential_evaluation,
        resume=args.resume, latest_link=Path(args.latest_link) if args.latest_link else None, aggregation=args.aggregation, max_update_ratio=args.max_update_ratio,
        transfer=_transfer(args),
        security=client_security(args), keep_round_models=args.keep_round_models, stop=stop,
    )


def _transfer(args: argparse.Namespace) -> TransferSettings:
    name = {"raw": "none", "zlib": "zlib"}[args.encoding] if args.encoding else args.compression
    encoding = COMPRESSION[name]
    if args.compress_global_model and name not in ("fp16", "bf16"):
        raise ValueError(f"--compress-global-model goes with --compression fp16 or bf16, not {name} (zlib always "
                         f"compresses the global model; int8 deltas need it exact on both sides)")
    model_encoding = encoding if name == "zlib" or args.compress_global_model else pb.CHUNK_ENCODING_RAW
    return TransferSettings(chunk_size=args.chunk_size, encoding=encoding, model_encoding=model_encoding)


async def train(args: argparse.Namespace, observer: RunObserver, stop: asyncio.Event | None = None) -> None:
    """A `train` run from its parsed arguments (also how the control API's runs train)."""
    if bool(args.workers) == bool(args.workers_dns):
        raise ValueError("give either --workers NAME=HOST:PORT,... or --workers-dns HOST:PORT with --expect-workers")
    if args.workers:
        workers = parse_workers(args.workers)
    else:
        if args.expect_workers < 1:
            raise ValueError("--workers-dns needs --expect-workers N (N >= 1)")
        workers = await discover(args.workers_dns, args.expect_workers, args.discovery_timeout)
    task = make_task(args)
    test = task.test_data()
    await run(_run_config(args, workers, task, args.workers_dns, stop), _strategy(args, len(workers)), test, observer)


async def _demo(args: argparse.Namespace, observer: RunObserver) -> None:
    # Load the data once, here, so the workers need not each try (and race) to download it.
    task = make_task(args)
    test = task.test_data()
    worker_args = ["--task", args.task, "--data-dir", args.data_dir, "--no-download",
                   "--partition-scheme", args.partition_scheme, "--partition-alpha", str(args.partition_alpha),
                   "--threads", str(args.worker_threads)]
    if isinstance(task, MnistTask):
        worker_args += ["--model", task.architecture, "--dataset", task.data_name]
    log_dir = Path(args.output_dir) / "workers"
    with demo_cluster(args.local_workers, worker_args, log_dir) as cluster:
        log.info("local_workers_starting", workers=[w.address for w in cluster.workers], logs=str(log_dir))
        await cluster.wait_serving(timeout=args.startup_timeout)
        workers = [(w.name, w.address) for w in cluster.workers]
        await run(_run_config(args, workers, task), _strategy(args, len(workers)), test, observer)


def _observers(args: argparse.Namespace) -> Observers:
    """The live view on a terminal (the other log lines print above it), Prometheus metrics when asked for."""
    observers: list[RunObserver] = []
    if wants_console(args.log_format) and sys.stdout.isatty():
        progress = LiveProgress(args.batch_size)
        configure_logging("console", file=progress.log_file(), drop=LiveProgress.SHOWN_EVENTS)
        observers.append(progress)
    else:
        configure_logging(args.log_format)
    if args.metrics_port:
        metrics = PrometheusObserver()
        metrics.serve(args.metrics_port, args.metrics_host)
        log.info("metrics_serving", url=f"http://{args.metrics_host}:{args.metrics_port}/metrics")
        observers.append(metrics)
    return Observers(observers)


def list_tasks() -> int:
    """Print the installed tasks, one per line: name, version and where it comes from."""
    for name, ep in sorted(tasks.installed().items()):
        package = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
        try:
            version = tasks.task_class(name).version
        except tasks.TaskError as exc:
            version = f"(cannot be imported: {exc})"
        print(f"{name:<20} {version:<10} {ep.value}  [{package}]")
    if tasks.DEFAULT_TASK not in tasks.installed():
        print(f"{tasks.DEFAULT_TASK:<20} built in")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m coordinator_service") -> int:
    args = parse_args(argv, prog)
    if args.command == "tasks":
        return list_tasks()
    if args.command == "serve":
        if args.threads:
            torch.set_num_threads(args.threads)
        return _serve(args)
    observer = _observers(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    freeze_startup_objects()
    try:
        asyncio.run(train(args, observer) if args.command == "train" else _demo(args, observer))
    except (HandshakeFailed, RoundFailed, DiscoveryFailed, CheckpointMismatch, datasets.DatasetUnavailable,
            tasks.TaskError, ValueError, OSError) as exc:
        log.error("training_failed", reason=str(exc))
        return 1
    except KeyboardInterrupt:
        log.warning("training_interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
