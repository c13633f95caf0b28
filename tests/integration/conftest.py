"""Real worker processes on 127.0.0.1, started once per module and always stopped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from coordinator_service.local import LocalCluster, LocalWorker
from fedpi.net.protocol import PROTOCOL_VERSION, VERSION_METADATA_KEY
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT

DIGITS = ["--dataset", "digits-5k", "--no-download", "--threads", "1"]
METADATA = ((VERSION_METADATA_KEY, PROTOCOL_VERSION),)


def start_cluster(workers: list[LocalWorker]) -> LocalCluster:
    """Start the workers and wait until all serve; the caller stops the cluster."""
    cluster = LocalCluster(workers).__enter__()
    try:
        asyncio.run(cluster.wait_serving(timeout=120))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def digits_cluster(tmp_path_factory):
    """alice, bob and charlie, each with a third of the 4,000 training digits."""
    logs = tmp_path_factory.mktemp("workers")
    names = ["alice", "bob", "charlie"]
    cluster = start_cluster([LocalWorker(n, [*DIGITS, "--partition", f"{i}/3"], logs) for i, n in enumerate(names)])
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One worker with a 1 MiB chunk limit, and a sync stub for poking it."""
    logs = tmp_path_factory.mktemp("worker")
    cluster = start_cluster([LocalWorker("solo", [*DIGITS, "--max-chunk-mb", "1"], logs)])
    channel = grpc.insecure_channel(cluster.workers[0].address)
    yield cluster.workers[0], pb_grpc.WorkerStub(channel)
    channel.close()
    cluster.stop()


def run_coordinator(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator_service", *args, "--log-format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def events(stdout: str) -> list[dict]:
    """The JSON log events in a process's output."""
    out = []
    for line in stdout.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
