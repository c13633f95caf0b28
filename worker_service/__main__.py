"""python -m worker_service --id alice --port 50051 --dataset mnist --partition 0/3
   python -m worker_service --id alice --port 50051 --task breast-cancer --partition 0/3   # another task

Every flag can also be set from an environment variable FEDPI_<FLAG> (e.g. FEDPI_PARTITION=0/3), for Kubernetes.
"""

from __future__ import annotations

# Before torch is imported: on a CPU this torch cannot run, say so in one line instead of dying with SIGILL.
from fedpi import preflight

preflight.run_if_asked()

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog
import torch

from fedpi import data as datasets
from fedpi import task as tasks
from fedpi.cli import add_task_arguments, apply_env_defaults, freeze_startup_objects, make_task, read_secret
from fedpi.logs import LOG_FORMATS, configure_logging
from fedpi.auth import ServerSecurity, exposure
from worker_service.servicer import Limits, WorkerServicer
from worker_service.trainer import DEFAULT_MAX_LOCAL_BATCHES
from worker_service.server import serve

log = structlog.get_logger()
MIB = 1 << 20


def parse_args(argv: list[str] | None = None, prog: str = "python -m worker_service") -> argparse.Namespace:
    """`prog`: how the user called this (the `fedpi` command passes its own name), for --help and errors."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--id", default=os.environ.get("HOSTNAME", "worker"), help="worker name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; beyond loopback it needs --token-file with TLS, mutual TLS, or "
                        "--insecure")
    p.add_argument("--port", type=int, default=50051)
    add_task_arguments(p, default_dataset="mnist")
    p.add_argument("--partition", default="0/1", help="INDEX/COUNT: this worker's data shard")
    p.add_argument("--partition-index", type=int, default=None,
                   help="overrides INDEX of --partition (Kubernetes: the StatefulSet pod index)")
    p.add_argument("--partition-count", type=int, default=None, help="overrides COUNT of --partition")
    p.add_argument("--partition-scheme", choices=datasets.PARTITION_SCHEMES, default="iid")
    p.add_argument("--partition-alpha", type=float, default=datasets.DEFAULT_DIRICHLET_ALPHA,
                   help="with --partition-scheme dirichlet: the concentration (0.1: few classes per worker)")
    p.add_argument("--partition-seed", type=int, default=0,
                   help="seed of the iid shuffle; must be the same on every worker")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-payload-mb", type=int, default=1024,
                   help="largest weight upload accepted")
    p.add_argument("--max-chunk-mb", type=int, default=4, help="largest chunk accepted")
    p.add_argument("--upload-grace", type=float, default=30.0,
                   help="seconds a SetWeights stream gets for its header, and on top of its size at 256 KiB/s")
    p.add_argument("--max-local-batches", type=int, default=DEFAULT_MAX_LOCAL_BATCHES,
                   help="most batches one Train may ask for (announced in GetInfo)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to finish calls on SIGTERM")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    p.add_argument("--progress-interval", type=float, default=2.0,
                   help="seconds between Train progress messages (they show the coordinator this worker is alive)")
    p.add_argument("--train-delay", type=float, default=0.0,
                   help="extra seconds per training batch, to imitate a slower device (fault tests, demos)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off)")
    p.add_argument("--health-port", type=int, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (kubelet probes cannot do TLS)")
    g = p.add_argument_group("security (see README: Threat model)")
    g.add_argument("--token-file", help="require this bearer token (file contents) on every call but health checks")
    g.add_argument("--tls-cert", help="serve TLS with this certificate")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    g.add_argument("--insecure", action="store_true",
                   help="serve beyond loopback without authentication, or with the token in plaintext (shown in "
                        "the log and in GetInfo)")
    g.add_argument("--client-identity", help="with mutual TLS: the certificate name (CN or SAN) that may call, "
                                             "e.g. fedpi-coordinator; other certificates get PERMISSION_DENIED")
    apply_env_defaults(p)
    return p.parse_args(argv)


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
    log.info("task_loaded", task=task.describe(), dataset=task.data_name, partition=partition.describe(),
             train_samples=len(train), test_samples=len(test))
    return WorkerServicer(
        worker_id=args.id, model_name=task.architecture, model=model,
        data=datasets.Dataset(task.data_name, train, test), partition=partition.describe(), task=task,
        limits=Limits(max_chunk_bytes=args.max_chunk_mb * MIB, max_payload_bytes=args.max_payload_mb * MIB,
                      max_local_batches=args.max_local_batches, upload_grace=args.upload_grace),
        train_delay=args.train_delay, progress_every=args.progress_interval,
    )


def build_security(args: argparse.Namespace) -> ServerSecurity:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")
    if args.client_identity and not args.tls_client_ca:
        raise ValueError("--client-identity needs mutual TLS (--tls-client-ca)")
    path = lambda value: Path(value) if value else None  # noqa: E731
    security = ServerSecurity(
        token=read_secret(args.token_file, "--token-file") if args.token_file else None,
        cert_file=path(args.tls_cert), key_file=path(args.tls_key), client_ca_file=path(args.tls_client_ca),
        client_identity=args.client_identity,
    )
    for f in (security.cert_file, security.key_file, security.client_ca_file):
        if f is not None and not f.is_file():
            raise ValueError(f"{f}: no such file")
    return security


def exposure_warning(args: argparse.Namespace, security: ServerSecurity) -> str:
    """'' when serving safely; what is unsafe when --insecure allows it; ValueError when it does not."""
    problem = exposure(args.host, args.port, security, token_hint="add --tls-cert and --tls-key",
                       auth_hint="add --token-file with --tls-cert/--tls-key, or --tls-client-ca")
    if problem and not args.insecure:
        raise ValueError(f"refusing to serve: {problem}; or pass --insecure to accept that")
    return f"--insecure: {problem}" if problem else ""


def main(argv: list[str] | None = None, prog: str = "python -m worker_service") -> int:
    args = parse_args(argv, prog)
    configure_logging(args.log_format)
    structlog.contextvars.bind_contextvars(worker=args.id)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        security = build_security(args)
        warning = exposure_warning(args, security)
        servicer = build_servicer(args)
    except (datasets.DatasetUnavailable, tasks.TaskError, ValueError) as exc:
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
        asyncio.run(serve(servicer, f"{args.host}:{args.port}", grace=args.grace, security=security,
                          health_address=health_address))
    except OSError as exc:  # a port that is taken, an address this machine does not have
        log.error("worker_failed_to_start", reason=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
