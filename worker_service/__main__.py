"""fedpi's worker: `fedpi worker` (also `python -m worker_service`); its command line is in worker_service/cli.py."""

from __future__ import annotations

# Before torch is imported: on a CPU this torch cannot run, say so in one line instead of dying with SIGILL.
from fedpi import preflight

preflight.run_if_asked()

import argparse
import asyncio
import sys

import structlog
import torch

from fedpi import data as datasets
from fedpi import task as tasks
from fedpi.cli import make_task
from fedpi.logs import configure_logging
from fedpi.net.auth import SecurityFlags, ServerSecurity, server_security
from fedpi.net.auth import exposure_warning as fedpi_exposure_warning
from fedpi.net.ports import check_free
from fedpi.runtime import freeze_startup_objects, read_secret
from worker_service.board import Board
from worker_service.cli import parse_args
from worker_service.server import serve
from worker_service.servicer import Limits, WorkerServicer

log = structlog.get_logger()
MIB = 1 << 20


def build_servicer(args: argparse.Namespace) -> WorkerServicer:
    index, count = datasets.parse_partition(args.partition)
    if args.partition_index is not None:
        index = args.partition_index
    if args.partition_count is not None:
        count = args.partition_count
    index, count = datasets.parse_partition(f"{index}/{count}")
    partition = tasks.Partition(index, count, args.partition_scheme, args.partition_seed, args.partition_alpha)
    task = make_task(args)
    model = tasks.initial_model(task)
    train, test = tasks.load_partition(task, partition)
    log.info(
        "task_loaded",
        task=task.describe(),
        dataset=task.data_name,
        partition=partition.describe(),
        train_samples=len(train),
        test_samples=len(test),
    )
    return WorkerServicer(
        worker_id=args.id,
        model_name=task.architecture,
        model=model,
        data=datasets.Dataset(task.data_name, train, test),
        partition=partition.describe(),
        task=task,
        limits=Limits(
            max_chunk_bytes=args.max_chunk_mb * MIB,
            max_payload_bytes=args.max_payload_mb * MIB,
            max_local_batches=args.max_local_batches,
            upload_grace=args.upload_grace,
        ),
        train_delay=args.train_delay,
        progress_every=args.progress_interval,
        board=Board(args.board_root),
    )


def build_security(args: argparse.Namespace) -> ServerSecurity:
    return server_security(
        SecurityFlags(),
        token=read_secret(args.token_file, "--token-file") if args.token_file else None,
        cert=args.tls_cert,
        key=args.tls_key,
        client_ca=args.tls_client_ca,
        client_identity=args.client_identity,
    )


def exposure_warning(args: argparse.Namespace, security: ServerSecurity) -> str:
    """'' when serving safely; what is unsafe when --insecure allows it; ValueError when it does not."""
    return fedpi_exposure_warning(args.host, args.port, security, SecurityFlags(), args.insecure)


def main(argv: list[str] | None = None, prog: str = "fedpi worker") -> int:
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_format)
    structlog.contextvars.bind_contextvars(worker=args.id)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        security = build_security(args)
        warning = exposure_warning(args, security)
        for port in (args.port, args.health_port, args.metrics_port):  # a taken port, said before the data loads
            if port:
                check_free(f"{args.host}:{port}")
        servicer = build_servicer(args)
    except (datasets.DatasetUnavailable, tasks.TaskError, ValueError, OSError) as exc:
        log.error("worker_failed_to_start", reason=str(exc))
        return 2
    servicer.warning = warning
    if warning:
        log.warning("worker_insecure", warning=warning)
    try:
        if args.metrics_port:
            servicer.metrics.serve(args.metrics_port, args.host)
            log.info("metrics_serving", url=f"http://{args.host}:{args.metrics_port}/metrics")
        health_address = f"{args.host}:{args.health_port}" if args.health_port else None
        freeze_startup_objects()
        asyncio.run(
            serve(
                servicer, f"{args.host}:{args.port}", grace=args.grace, security=security, health_address=health_address
            )
        )
    except OSError as exc:  # a port that is taken, an address this machine does not have
        log.error("worker_failed_to_start", reason=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
