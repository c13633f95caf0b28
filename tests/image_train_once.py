"""Inside an image (e.g. on an emulated Pi CPU): start a worker on loopback with random digits, and train once.

python /check/train_once.py   (this file mounted alone, not tests/, whose folders would shadow the packages)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from coordinator_service.engine.worker_client import Expected, WorkerClient
from coordinator_service.local import free_port, wait_serving
from fedpi.data import write_idx
from fedpi.mnist_task import MnistTask
from fedpi.task import initial_model
from generated.fedpi.v1 import worker_pb2 as pb


async def train(address: str) -> None:
    client = WorkerClient("pi", address, idle_timeout=600, rpc_timeout=600)
    try:
        task = MnistTask(model="reference-cnn")
        info = await client.handshake(Expected.of(task, initial_model(task)))
        started = time.monotonic()
        result = await client.train(pb.TrainRequest(round=0, local_batches=5, batch_size=32, learning_rate=0.01))
        print(
            f"Train finished on {info.cpu_architecture} with torch {info.torch_version}: {result.batches} batches, "
            f"{result.samples} samples, loss {result.mean_loss:.3f}, {time.monotonic() - started:.1f} s",
            flush=True,
        )
    finally:
        await client.close()


def main() -> int:
    data = Path(tempfile.mkdtemp())
    gen = np.random.default_rng(0)
    for prefix, n in (("train", 320), ("t10k", 64)):
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", gen.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", gen.integers(0, 10, n, dtype=np.uint8))
    port = free_port()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dataset",
            "mnist",
            "--data-dir",
            str(data),
            "--no-download",
            "--log-format",
            "json",
        ],
        env=os.environ,
    )
    started = time.monotonic()
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", worker, timeout=900))
        print(f"worker SERVING {time.monotonic() - started:.0f} s after start", flush=True)
        asyncio.run(train(f"127.0.0.1:{port}"))
    finally:
        worker.terminate()
        worker.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
