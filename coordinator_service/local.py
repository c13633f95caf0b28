"""Start worker processes on this machine (for the demo, tests and benchmarks) and stop them whatever happens."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEMO_NAMES = ("alice", "bob", "charlie", "dave", "erin", "frank", "grace", "heidi")


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port free on 127.0.0.1 now that this process has not handed out before: ports picked before any of their
    workers binds (a worker's gRPC and metrics ports, say) could otherwise be the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port


async def wait_serving(
    address: str, process: subprocess.Popen | None, timeout: float = 120.0, log_path: Path | None = None
) -> None:
    """Wait until the worker's health service says SERVING; fail early if its process died."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
                raise RuntimeError(f"worker at {address} exited with {process.returncode}:\n{tail}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker at {address} not serving after {timeout:.0f} s; see {log_path}")
            await asyncio.sleep(0.2)


class LocalWorker:
    """One `python -m worker_service` process on 127.0.0.1, its output in a log file."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_dir: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        health_port: bool = False,
        module: str = "worker_service",
    ):
        """`health_port`: serve health on a second, plaintext port and wait on that (for TLS workers). `module` runs
        another entry point with the worker's flags (tests use one that misbehaves)."""
        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.health_address = f"127.0.0.1:{free_port()}" if health_port else self.address
        self.log_path = log_dir / f"{name}.log"
        self.argv = [
            sys.executable,
            "-m",
            module,
            "--id",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-format",
            "json",
            *args,
        ]
        if health_port:
            self.argv += ["--health-port", self.health_address.rsplit(":", 1)[1]]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"worker {self.name} is already running (pid {self.process.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        """kill -9, and wait until it is gone: a start right after must not find it still exiting."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def wait_serving(self, timeout: float = 120.0) -> None:
        await wait_serving(self.health_address, self.process, timeout, self.log_path)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


class LocalCluster:
    """A context manager around several LocalWorkers: all stopped on exit, also on Ctrl-C, SIGTERM (`timeout`, a
    service manager) or an exception."""

    def __init__(self, workers: Sequence[LocalWorker]):
        self.workers = list(workers)
        self._sigterm: Any = None

    def __enter__(self) -> LocalCluster:
        # SIGTERM's default ends the process at once, without the `with` that stops the workers; SystemExit unwinds
        # it like Ctrl-C. Only the main thread may set a handler.
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            for w in self.workers:
                w.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        try:
            for w in self.workers:
                w.stop()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None

    async def wait_serving(self, timeout: float = 120.0) -> None:
        await asyncio.gather(*(w.wait_serving(timeout) for w in self.workers))

    @property
    def spec(self) -> str:
        return ",".join(f"{w.name}={w.address}" for w in self.workers)


def demo_cluster(count: int, worker_args: Sequence[str], log_dir: Path) -> LocalCluster:
    names = [DEMO_NAMES[i] if i < len(DEMO_NAMES) else f"worker{i}" for i in range(count)]
    return LocalCluster(
        [LocalWorker(name, [*worker_args, "--partition", f"{i}/{count}"], log_dir) for i, name in enumerate(names)]
    )
