"""`make bench BENCH=wire`: how close rounds come to the wire, beside raw TCP measured in the same run.

1. raw TCP: 1 GB over loopback, and 50 MB into an emulated Pi (pilan), between two plain Python processes.
2. loopback: 3 local workers, one local batch a round; the round overhead (wall beyond the slowest worker's training;
   the coordinator's evaluation runs beside the next round, so it is not in it) for the reference CNN and the 105 MB
   large-mlp, and what the latter's transfers come to against raw loopback TCP; beside it, the same bytes moved
   alone (no training, folding or evaluation): what moving them through gRPC costs on its own.
3. Pi LAN: 3 workers as emulated Pi 4s (pilan: 100 Mbit/s each, 15% of a core), raw and compressed updates, against
   the transfer floor (the bytes a worker moves down and up, over its link's nominal rate). Needs root and pilan.
4. accuracy: the reference workload (20 rounds, 8,000 / 2,000 real MNIST digits) under each compression.
5. memory: peak RSS of the coordinator and of a worker on the 105 MB model, against a bare `import torch`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench import pilan
from coordinator_service.engine.worker_client import Expected, WorkerClient, upload_digest
from coordinator_service.local import LocalCluster, demo_cluster
from fedpi.mnist_task import MnistTask
from fedpi.runtime import peak_rss_mb
from fedpi.task import initial_model
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from tests.conftest import ROOT, SHARED_MNIST
from tests.integration.conftest import DIGITS, events, run_coordinator

LINK_BITS_PER_SECOND = 100e6
RECEIVER = """
import socket, sys
server = socket.socket(); server.bind((sys.argv[1], 0)); server.listen(1)
print(server.getsockname()[1], flush=True)
conn, _ = server.accept(); buf = bytearray(4 << 20); total = 0
while (n := conn.recv_into(buf)):
    total += n
print(total, flush=True)
"""


@dataclass
class Table:
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, figure: str, target: str = "") -> None:
        self.rows.append((what, figure, target))
        print(f"wire       {what}: {figure}" + (f"  (target {target})" if target else ""), flush=True)

    def print(self) -> None:
        print("\n| measured | figure | target |\n|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def raw_tcp(nbytes: int, host: str = "127.0.0.1", connect: str | None = None, prefix: tuple[str, ...] = ()) -> float:
    """Bytes per second from this process to a receiver process, as plain TCP moves them."""
    receiver = subprocess.Popen([*prefix, sys.executable, "-c", RECEIVER, host], stdout=subprocess.PIPE, text=True)
    try:
        port = int(receiver.stdout.readline())
        block = memoryview(bytes(4 << 20))
        with socket.create_connection((connect or host, port), timeout=60) as s:
            start = time.perf_counter()
            sent = 0
            while sent < nbytes:
                s.sendall(block[: min(len(block), nbytes - sent)])
                sent += min(len(block), nbytes - sent)
            s.shutdown(socket.SHUT_WR)
            assert int(receiver.stdout.readline()) == nbytes
            return nbytes / (time.perf_counter() - start)
    finally:
        receiver.kill()
        receiver.wait()


HASHING = """
import os, time
from fedpi.weights.serde import DIGESTS, DIGESTS_BEFORE_1_6, fastest_digest
data = os.urandom(105_000_000)
for name, digest in DIGESTS.items():
    start = time.perf_counter(); digest(data).digest(); print(name, time.perf_counter() - start)
print("fastest", fastest_digest())
print("fastest_before_1_6", fastest_digest(DIGESTS_BEFORE_1_6))
"""


def hashing(table: Table) -> None:
    """What hashing a 105 MB update costs a worker with a Pi 4's share of CPU, with this CPU's SHA instructions and
    without them (OpenSSL told to ignore them: a Pi 4's Cortex-A72 has no crypto extensions)."""
    for label, env in (("with SHA instructions", {}), ("without (as a Pi 4)", {"OPENSSL_ia32cap": ":~0x20000000"})):
        out = subprocess.run(
            [str(pilan.PILAN), "exec", "1", sys.executable, "-c", HASHING],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **env},
            cwd=ROOT,
        ).stdout.split("\n")
        figures = dict(line.split() for line in out if line)
        table.add(
            f"hashing 105 MB at 15% of a core, {label}",
            f"sha256 {float(figures['sha256']):.2f} s, blake2b {float(figures['blake2b']):.2f} s, xxh3_128 "
            f"{float(figures['xxh3_128']):.3f} s; a worker here picks {figures['fastest']} "
            f"({figures['fastest_before_1_6']} for a coordinator before protocol 1.6)",
        )


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(spec: str, out: Path, model: str, rounds: int, *extra: str) -> tuple[list[dict], dict]:
    proc = run_coordinator(
        "train",
        "--workers",
        spec,
        "--model",
        model,
        "--rounds",
        str(rounds),
        "--local-batches",
        "1",
        "--dataset",
        "digits-5k",
        "--min-workers",
        "3",
        "--output-dir",
        str(out),
        *extra,
        timeout=3600,
    )
    finished = [e for e in events(proc.stdout) if e.get("event") == "training_finished"]
    if proc.returncode or not finished:
        sys.exit(f"wire benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return _rounds(out)[1:], finished[0]  # round 1 warms up


def _moved(r: dict) -> int:
    return sum(w["bytes_sent"] + w["bytes_received"] for w in r["workers"].values())


def _floor(r: dict) -> float:
    """Seconds the busiest worker's bytes take over its own link at the nominal rate."""
    return max((w["bytes_sent"] + w["bytes_received"]) * 8 / LINK_BITS_PER_SECOND for w in r["workers"].values())


class Transfers(NamedTuple):
    seconds: float  # median wall of one repetition
    coordinator_cpu: float  # CPU seconds (user + system) per repetition, this process's
    workers_cpu: float  # the same, all workers together


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _transfers_alone(cluster: LocalCluster, model: str, repeats: int = 8) -> Transfers:
    """Send the global model to every worker at once and fetch every worker's model back, through the coordinator's
    own clients with digests checked, and nothing else: no training, no folding, no evaluation. What moving a
    round's bytes through gRPC costs on this machine, in wall time and in CPU."""
    task = MnistTask(model=model)
    clients = [WorkerClient(w.name, w.address) for w in cluster.workers]
    try:
        await asyncio.gather(*(c.handshake(Expected.of(task, initial_model(task))) for c in clients))
        payload = serde.WeightsPayload(initial_model(task).state_dict(), round=1, architecture=model)

        async def fetch(client: WorkerClient) -> None:
            reader = serde.StreamReader(
                architecture=model, expected=payload.manifest, max_payload_bytes=payload.total_bytes
            )
            async for chunk in client.get_weights(
                serde.DEFAULT_CHUNK_BYTES, pb.CHUNK_ENCODING_RAW, payload.total_bytes, digest_in_trailer=True
            ):
                reader.accept(chunk)
            reader.finish()

        times = []
        cpu = os.times(), [_cpu_seconds(w.process.pid) for w in cluster.workers]
        for _ in range(repeats):
            t = time.perf_counter()
            send = payload.broadcast(
                len(clients), serde.DEFAULT_CHUNK_BYTES, pb.CHUNK_ENCODING_RAW, upload_digest(clients[0])
            )
            await asyncio.gather(*(c.set_weights(send, payload.total_bytes) for c in clients))
            await asyncio.gather(*map(fetch, clients))
            times.append(time.perf_counter() - t)
        mine = os.times()
        return Transfers(
            statistics.median(times),
            (mine.user + mine.system - cpu[0].user - cpu[0].system) / repeats,
            sum(_cpu_seconds(w.process.pid) for w in cluster.workers) / repeats - sum(cpu[1]) / repeats,
        )
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def bare_torch_rss_mb() -> float:
    """Peak RSS of a Python that only imports torch: the floor under every fedpi process."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; from fedpi.runtime import peak_rss_mb; print(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    ).stdout
    return float(out)


def loopback(tmp: Path, table: Table, raw: float) -> None:
    median = statistics.median
    with demo_cluster(3, DIGITS, tmp / "cnn") as cluster:
        asyncio.run(cluster.wait_serving(timeout=300))
        rounds, _ = _train(cluster.spec, tmp / "cnn-out", "reference-cnn", 11)
        sequential, _ = _train(cluster.spec, tmp / "cnn-sequential", "reference-cnn", 11, "--sequential-evaluation")
    table.add(
        "loopback, reference CNN (1.7 MB), 3 workers: overhead per round",
        f"{median(r['overhead_seconds'] for r in rounds):.3f} s (median of rounds 2-11; evaluation "
        f"{median(r['evaluation_seconds'] for r in rounds):.3f} s beside the next round, on the same 2 cores); "
        f"{median(r['overhead_seconds'] for r in sequential):.3f} s with --sequential-evaluation",
        "<= 0.05 s",
    )
    with demo_cluster(3, [*DIGITS, "--model", "large-mlp"], tmp / "big") as cluster:
        asyncio.run(cluster.wait_serving(timeout=300))
        alone = asyncio.run(_transfers_alone(cluster, "large-mlp"))
        rounds, finished = _train(cluster.spec, tmp / "big-out", "large-mlp", 12)
        sequential, _ = _train(cluster.spec, tmp / "big-sequential", "large-mlp", 12, "--sequential-evaluation")
        worker_rss = max(peak_rss_mb(w.process.pid) for w in cluster.workers)
    moved = median(_moved(r) for r in rounds)
    overhead = median(r["overhead_seconds"] for r in rounds)
    sequential_overhead = median(r["overhead_seconds"] for r in sequential)
    table.add(
        "loopback, large-mlp (105 MB), 3 workers: overhead per round",
        f"{overhead:.2f} s (median of rounds 2-12; evaluation {median(r['evaluation_seconds'] for r in rounds):.2f}"
        f" s beside the next round, on the same 2 cores): {moved / 1e6:.0f} MB moved at "
        f"{moved / overhead / 1e9:.2f} GB/s, {moved / overhead / raw:.0%} of raw loopback TCP; "
        f"{sequential_overhead:.2f} s with --sequential-evaluation ({moved / sequential_overhead / raw:.0%})",
        "<= 0.6 s, >= 30%",
    )
    table.add(
        "loopback, large-mlp (105 MB), 3 workers: the same transfers alone (the global model to all three, "
        "their models back; no training, folding or evaluation)",
        f"{alone.seconds:.2f} s (median of 8): {moved / alone.seconds / 1e9:.2f} GB/s, "
        f"{moved / alone.seconds / raw:.0%} of raw loopback TCP; CPU per repetition: coordinator "
        f"{alone.coordinator_cpu:.2f} s, the workers together {alone.workers_cpu:.2f} s, on {os.cpu_count()} cores",
    )
    bare = bare_torch_rss_mb()
    table.add(
        "peak RSS on large-mlp (105 MB), 3 workers",
        f"coordinator {finished['peak_rss_mb']:.0f} MB, worker {worker_rss:.0f} MB; bare `import torch` {bare:.0f} MB",
    )


def lan(tmp: Path, table: Table) -> None:
    if not pilan.available():
        table.add("Pi LAN", f"skipped: needs root and pilan at {pilan.PILAN}")
        return
    median = statistics.median
    with pilan.lan(3, rate="100mbit", cpu_pct=15):
        into_pi = raw_tcp(
            50_000_000, host="0.0.0.0", connect=pilan.pilan("addr", "1"), prefix=(str(pilan.PILAN), "exec", "1")
        )
        table.add("raw TCP into an emulated Pi 4 (100 Mbit/s link)", f"{into_pi * 8 / 1e6:.1f} Mbit/s")
        hashing(table)
        for model, rounds, settings in (
            ("reference-cnn", 6, (("none", ()),)),
            ("large-mlp", 4, (("none", ()), ("fp16", ("--compression", "fp16")), ("int8", ("--compression", "int8")))),
        ):
            workers = [
                pilan.pi_worker(i, f"pi{i}", [*DIGITS, "--model", model, "--partition", f"{i - 1}/3"], tmp / model)
                for i in (1, 2, 3)
            ]
            with LocalCluster(workers) as cluster:
                asyncio.run(cluster.wait_serving(timeout=900))
                spec = ",".join(f"{w.name}={w.address}" for w in cluster.workers)
                for name, extra in settings:
                    result, _ = _train(spec, tmp / f"{model}-{name}", model, rounds, *extra)
                    floor = median(_floor(r) for r in result)
                    overhead = median(r["overhead_seconds"] for r in result)
                    wall = median(r["wall_seconds"] for r in result)
                    target = {"reference-cnn": "<= 1.5x floor", "large-mlp": "<= 1.15x floor"}[model]
                    if name == "none":
                        raw_floor = floor
                        table.add(
                            f"Pi LAN, {model}, raw: overhead per round",
                            f"{overhead:.2f} s = {overhead / floor:.2f}x the transfer floor of {floor:.2f} s "
                            f"(wall {wall:.2f} s)",
                            target,
                        )
                    else:
                        table.add(
                            f"Pi LAN, {model}, {name} updates: round wall",
                            f"{wall:.2f} s = {wall / raw_floor:.2f}x the raw transfer floor of {raw_floor:.2f} s "
                            f"(overhead {overhead:.2f} s = {overhead / floor:.2f}x its own floor of "
                            f"{floor:.2f} s)",
                            "int8 wall < raw floor" if name == "int8" else "",
                        )


def accuracy(tmp: Path, table: Table) -> None:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        table.add("accuracy under compression", f"skipped: no MNIST digits at {SHARED_MNIST}")
        return
    final = {}
    for name in ("none", "fp16", "bf16", "int8"):
        out = tmp / f"accuracy-{name}"
        proc = run_coordinator(
            "demo",
            "--preset",
            "seed",
            "--local-workers",
            "3",
            "--rounds",
            "20",
            "--dataset",
            "mnist-10k",
            "--data-dir",
            str(SHARED_MNIST),
            "--partition-scheme",
            "contiguous",
            "--lr",
            "0.01",
            "--batch-size",
            "64",
            "--local-batches",
            "50",
            "--compression",
            name,
            "--output-dir",
            str(out),
            timeout=3600,
        )
        if proc.returncode:
            sys.exit(f"accuracy benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        final[name] = _rounds(out)[-1]["test_accuracy"]
    table.add("reference workload, 20 rounds, no compression", f"{final['none']:.2%}")
    for name, target in (("fp16", "within 0.1 point"), ("bf16", ""), ("int8", "within 0.5 point")):
        table.add(
            f"reference workload, 20 rounds, {name} updates",
            f"{final[name]:.2%} ({(final[name] - final['none']) * 100:+.2f} points)",
            target,
        )


def bench_wire(tmp: Path) -> None:
    table = Table()
    # The median of three: one gigabyte over loopback moved at anything from 3.8 to 5.5 GB/s from one run to the next.
    runs = sorted(raw_tcp(1_000_000_000) for _ in range(3))
    raw = runs[1]
    table.add(
        "raw loopback TCP, one stream", f"{raw / 1e9:.2f} GB/s (median of {', '.join(f'{r / 1e9:.2f}' for r in runs)})"
    )
    loopback(tmp, table, raw)
    lan(tmp, table)
    accuracy(tmp, table)
    table.print()
