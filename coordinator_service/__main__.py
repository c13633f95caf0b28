"""fedpi's coordinator: `fedpi train|demo|tasks|serve` (also `python -m coordinator_service ...`); its command lines
are in coordinator_service/cli.py."""

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

from coordinator_service import settings as run_settings
from coordinator_service.cli import build_parser, read_config, settings_of, show_config
from coordinator_service.control import launch
from coordinator_service.control.runspec import InvalidSpec, RunTarget, parse_address, parse_workers
from coordinator_service.engine.checkpoint import CheckpointMismatch
from coordinator_service.engine.discovery import DiscoveryFailed
from coordinator_service.engine.observer import Observers, RunObserver
from coordinator_service.engine.rounds import RoundFailed
from coordinator_service.engine.training import HandshakeFailed
from coordinator_service.local import demo_cluster
from coordinator_service.observe.board import BoardWatch
from coordinator_service.observe.metrics import PrometheusObserver
from coordinator_service.observe.progress import LiveProgress
from fedpi import data as datasets
from fedpi import task as tasks
from fedpi.logs import configure_logging, wants_console
from fedpi.mnist_task import MnistTask
from fedpi.runtime import freeze_startup_objects

log = structlog.get_logger()


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
    return RunTarget(
        task=args.task,
        model=args.model or "",
        dataset=args.dataset or "",
        workers=workers,
        workers_dns=dns,
        expect_workers=args.expect_workers,
    )


def place_of(args: argparse.Namespace) -> launch.RunPlace:
    security = launch.client_security(args.token_file, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    if security.token and not security.tls:
        log.warning("token_sent_in_clear", hint="without --tls-ca the bearer token crosses the network unencrypted")
    return launch.RunPlace(
        output_dir=Path(args.output_dir),
        security=security,
        data_dir=args.data_dir,
        download=not args.no_download,
        default_dataset=args.default_dataset,
        latest_link=Path(args.latest_link) if args.latest_link else None,
        keep_round_models=args.keep_round_models,
        discovery_timeout=getattr(args, "discovery_timeout", 600.0),
    )


async def _demo(
    args: argparse.Namespace, settings: run_settings.RunSettings, place: launch.RunPlace, observer: RunObserver
) -> None:
    # Load the data once, here, so the workers need not each try (and race) to download it.
    target = RunTarget(task=args.task, model=args.model or "", dataset=args.dataset or "")
    task = launch.make_task(target, place)
    test = task.test_data()
    worker_args = [
        "--task",
        args.task,
        "--data-dir",
        args.data_dir,
        "--no-download",
        "--partition-scheme",
        args.partition_scheme,
        "--partition-alpha",
        str(args.partition_alpha),
        "--threads",
        str(args.worker_threads),
    ]
    if isinstance(task, MnistTask):
        worker_args += ["--model", task.architecture, "--dataset", task.data_name]
    log_dir = place.output_dir / "workers"
    with demo_cluster(args.local_workers, worker_args, log_dir) as cluster:
        log.info("local_workers_starting", workers=[w.address for w in cluster.workers], logs=str(log_dir))
        await cluster.wait_serving(timeout=args.startup_timeout)
        workers = [(w.name, w.address) for w in cluster.workers]
        cfg = launch.run_config(settings, place, workers, task, resume=args.resume)
        await launch.run(cfg, launch.strategy(settings, len(workers)), test, observer)


def _observers(args: argparse.Namespace, settings: run_settings.RunSettings) -> Observers:
    """The live view on a terminal (the other log lines print above it), Prometheus metrics when asked for."""
    observers: list[RunObserver] = [BoardWatch()]
    if wants_console(args.log_format) and sys.stdout.isatty():
        progress = LiveProgress(settings.training.batch_size, rounds=settings.rounds)
        configure_logging("console", file=progress.log_file(), drop=LiveProgress.SHOWN_EVENTS)
        progress.start()  # at once: local workers and handshakes take a while
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


def main(argv: list[str] | None = None, prog: str = "fedpi") -> int:
    from fedpi.cli import innermost

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.command_parser, args.argv = innermost(parser, args), argv
    return run(args)


def run(args: argparse.Namespace) -> int:
    if args.command == "tasks":
        return list_tasks()
    try:
        read_config(args)
        if args.command == "config":
            return show_config(args)
    except ValueError as exc:
        print(f"fedpi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from coordinator_service.serve_cli import serve_main

        return serve_main(args)
    try:
        settings = settings_of(args)
        target = target_of(args) if args.command == "train" else None
    except ValueError as exc:
        print(f"fedpi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        observer = _observers(args, settings)
        freeze_startup_objects()
        place = place_of(args)
        if args.command == "train":
            asyncio.run(launch.train(target, settings, place, observer, resume=args.resume))
        else:
            asyncio.run(_demo(args, settings, place, observer))
    except (
        HandshakeFailed,
        RoundFailed,
        DiscoveryFailed,
        CheckpointMismatch,
        datasets.DatasetUnavailable,
        tasks.TaskError,
        ValueError,
        OSError,
    ) as exc:
        log.error("training_failed", reason=str(exc))
        return 1
    except KeyboardInterrupt:
        log.warning("training_interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
