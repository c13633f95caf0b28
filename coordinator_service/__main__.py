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
import sys
from pathlib import Path

import structlog
import torch

from coordinator_service import launch
from coordinator_service import settings as run_settings
from coordinator_service.checkpoint import CheckpointMismatch
from coordinator_service.local import demo_cluster
from coordinator_service.metrics import PrometheusObserver
from coordinator_service.observe import Observers, RunObserver
from coordinator_service.progress import LiveProgress
from coordinator_service.rounds import RoundFailed
from coordinator_service.serve_cli import add_serve_arguments, worker_security_arguments
from coordinator_service.runspec import InvalidSpec, RunTarget, parse_address, parse_workers
from coordinator_service.training import HandshakeFailed
from coordinator_service.worker_client import DiscoveryFailed
from fedpi import data as datasets
from fedpi import task as tasks
from fedpi.cli import add_task_arguments, apply_env_defaults, freeze_startup_objects
from fedpi.mnist_task import MnistTask
from fedpi.logs import LOG_FORMATS, configure_logging, wants_console

log = structlog.get_logger()

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(run_settings.PRESETS), default="default",
                   help="a starting configuration that FEDPI_* variables and flags override: default (measured, "
                        "README: Learning) or seed (fedpi's first configuration: plain SGD, lr 0.01)")
    # The coordinator evaluates on the task's held-out test set; workers load their own shards.
    add_task_arguments(p, default_dataset="auto")
    run_settings.add_arguments(p)
    p.add_argument("--encoding", choices=("raw", "zlib"), help=argparse.SUPPRESS)  # before --compression
    p.add_argument("--resume", action="store_true",
                   help="continue from checkpoint.pt in --output-dir after the last completed round")
    p.add_argument("--output-dir", default="runs/latest",
                   help="model.pt, metrics.jsonl and checkpoint.pt (after every round) go here")
    p.add_argument("--latest-link", help="also point this symlink at --output-dir (e.g. results/latest)")
    p.add_argument("--keep-round-models", type=int, default=0,
                   help="also keep the global model of the last N rounds in --output-dir/rounds/")
    worker_security_arguments(p.add_argument_group("security (see README: Threat model)"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for evaluation (0: torch's default)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics at http://--metrics-host:PORT/metrics while training (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")


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
    add_serve_arguments(sub.add_parser("serve", help="serve the fedpi.v1.Coordinator control API: start, watch, "
                                                     "stop and resume runs, fetch their models"))
    # Run settings take their FEDPI_* variables through the settings model (run_settings.env_layer), the rest here.
    apply_env_defaults(p, skip=set(run_settings.FIELDS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.parser = p
    return args


def settings_of(args: argparse.Namespace) -> run_settings.RunSettings:
    """defaults < --preset < FEDPI_* < flags, checked as a whole."""
    flags = run_settings.flag_layer(args)
    if args.encoding:
        flags.setdefault("compression", {"raw": "none", "zlib": "zlib"}[args.encoding])
    return run_settings.merge(run_settings.preset_layer(args.preset), run_settings.env_layer(), flags)


def target_of(args: argparse.Namespace) -> RunTarget:
    """`train`'s task and workers, from its flags."""
    if bool(args.workers) == bool(args.workers_dns):
        raise ValueError("give either --workers NAME=HOST:PORT,... or --workers-dns HOST:PORT with --expect-workers")
    if args.workers_dns and args.expect_workers < 1:
        raise ValueError("--workers-dns needs --expect-workers N (N >= 1)")
    try:
        workers = parse_workers([w for w in (args.workers or "").split(",") if w.strip()], "--workers")
        dns = parse_address(args.workers_dns, "--workers-dns") if args.workers_dns else None
    except InvalidSpec as exc:
        raise ValueError(str(exc)) from None
    return RunTarget(task=args.task, model=args.model or "", dataset=args.dataset or "", workers=workers,
                     workers_dns=dns, expect_workers=args.expect_workers)


def place_of(args: argparse.Namespace) -> launch.RunPlace:
    security = launch.client_security(args.token_file, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    if security.token and not security.tls:
        log.warning("token_sent_in_clear", hint="without --tls-ca the bearer token crosses the network unencrypted")
    return launch.RunPlace(
        output_dir=Path(args.output_dir), security=security, data_dir=args.data_dir, download=not args.no_download,
        default_dataset=args.default_dataset, latest_link=Path(args.latest_link) if args.latest_link else None,
        keep_round_models=args.keep_round_models, discovery_timeout=getattr(args, "discovery_timeout", 600.0))


async def _demo(args: argparse.Namespace, settings: run_settings.RunSettings, place: launch.RunPlace,
                observer: RunObserver) -> None:
    # Load the data once, here, so the workers need not each try (and race) to download it.
    target = RunTarget(task=args.task, model=args.model or "", dataset=args.dataset or "")
    task = launch.make_task(target, place)
    test = task.test_data()
    worker_args = ["--task", args.task, "--data-dir", args.data_dir, "--no-download",
                   "--partition-scheme", args.partition_scheme, "--partition-alpha", str(args.partition_alpha),
                   "--threads", str(args.worker_threads)]
    if isinstance(task, MnistTask):
        worker_args += ["--model", task.architecture, "--dataset", task.data_name]
    log_dir = place.output_dir / "workers"
    with demo_cluster(args.local_workers, worker_args, log_dir) as cluster:
        log.info("local_workers_starting", workers=[w.address for w in cluster.workers], logs=str(log_dir))
        await cluster.wait_serving(timeout=args.startup_timeout)
        workers = [(w.name, w.address) for w in cluster.workers]
        cfg = launch.run_config(settings, place, workers, task, resume=args.resume)
        await launch.run(cfg, launch.strategy(settings, len(workers)), test, observer)


def _observers(args: argparse.Namespace, batch_size: int) -> Observers:
    """The live view on a terminal (the other log lines print above it), Prometheus metrics when asked for."""
    observers: list[RunObserver] = []
    if wants_console(args.log_format) and sys.stdout.isatty():
        progress = LiveProgress(batch_size)
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
        from coordinator_service.serve_cli import serve_main

        return serve_main(args)
    try:
        settings = settings_of(args)
        target = target_of(args) if args.command == "train" else None
    except ValueError as exc:
        args.parser.error(f"{args.command}: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        observer = _observers(args, settings.training.batch_size)
        freeze_startup_objects()
        place = place_of(args)
        if args.command == "train":
            asyncio.run(launch.train(target, settings, place, observer, resume=args.resume))
        else:
            asyncio.run(_demo(args, settings, place, observer))
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
