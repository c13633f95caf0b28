"""`fedpi worker`: a worker serving the fedpi.v1.Worker service on this device.

  fedpi worker --id alice --port 50051 --dataset mnist --partition 0/3
  fedpi worker --id alice --port 50051 --task breast-cancer --partition 0/3   # another task

Every flag can also be set from an environment variable FEDPI_<FLAG> (e.g. FEDPI_PARTITION=0/3), for Kubernetes.
Its command line is built without importing torch or grpc, so that --help answers at once.
"""

from __future__ import annotations

import argparse
import os

from fedpi import names
from fedpi.cli import Parser, add_task_arguments, apply_env_defaults
from fedpi.logs import LOG_FORMATS


def parse_args(argv: list[str] | None = None, prog: str = "fedpi worker") -> argparse.Namespace:
    """`prog`: how the user called this, for --help and errors."""
    p = Parser(prog=prog, description=__doc__)
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", default=os.environ.get("HOSTNAME", "worker"), help="worker name")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; beyond loopback it needs --token-file with TLS, mutual TLS, or --insecure",
    )
    p.add_argument("--port", type=int, default=50051, help="port the worker service listens on")
    # The coordinator's default too: MNIST where it can be read or downloaded, else the shipped digits, said loudly.
    add_task_arguments(p, default_dataset="auto")
    p.add_argument("--partition", default="0/1", help="INDEX/COUNT: this worker's data shard")
    p.add_argument(
        "--partition-index",
        type=int,
        default=None,
        help="overrides INDEX of --partition (Kubernetes: the StatefulSet pod index)",
    )
    p.add_argument("--partition-count", type=int, default=None, help="overrides COUNT of --partition")
    p.add_argument(
        "--partition-scheme",
        choices=names.PARTITION_SCHEMES,
        default="iid",
        help="how the data is cut into shards; the same on every worker (labels: each sees only some classes)",
    )
    p.add_argument(
        "--partition-alpha",
        type=float,
        default=names.DEFAULT_DIRICHLET_ALPHA,
        help="with --partition-scheme dirichlet: the concentration (0.1: few classes per worker)",
    )
    p.add_argument(
        "--partition-seed", type=int, default=0, help="seed of the iid shuffle; must be the same on every worker"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-payload-mb", type=int, default=1024, help="largest weight upload accepted")
    p.add_argument("--max-chunk-mb", type=int, default=4, help="largest chunk accepted")
    p.add_argument(
        "--upload-grace",
        type=float,
        default=30.0,
        help="seconds a SetWeights stream gets for its header, and on top of its size at 256 KiB/s",
    )
    p.add_argument(
        "--max-local-batches",
        type=int,
        default=names.DEFAULT_MAX_LOCAL_BATCHES,
        help="most batches one Train may ask for (announced in GetInfo)",
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds to finish calls on SIGTERM")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="json (the default when stdout is not a terminal) or console (with the live view on a terminal)",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=2.0,
        help="seconds between Train progress messages (they show the coordinator this worker is alive)",
    )
    p.add_argument(
        "--train-delay",
        type=float,
        default=0.0,
        help="extra seconds per training batch, to imitate a slower device (fault tests, demos)",
    )
    p.add_argument(
        "--board-root",
        default="/",
        help="where to read the board's sysfs and procfs (GetInfo's health): a container may mount the host's "
        "/sys elsewhere",
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics at http://HOST:PORT/metrics (0: off)"
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (kubelet probes cannot do TLS)",
    )
    g = p.add_argument_group("security (see docs/threat-model.md)")
    g.add_argument("--token-file", help="require this bearer token (file contents) on every call but health checks")
    g.add_argument("--tls-cert", help="serve TLS with this certificate")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="serve beyond loopback without authentication, or with the token in plaintext (shown in "
        "the log and in GetInfo)",
    )
    g.add_argument(
        "--client-identity",
        help="with mutual TLS: the certificate name (CN or SAN) that may call, "
        "e.g. fedpi-coordinator; other certificates get PERMISSION_DENIED",
    )
    apply_env_defaults(p)
