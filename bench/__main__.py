"""Benchmarks with real processes on 127.0.0.1; `make bench` prints their figures.

0. wire: round overhead on loopback and on an emulated Pi LAN against raw TCP, compression's bytes and accuracy,
   peak RSS (bench/wire.py).
1. transport: the 105 MB large-mlp model through SetWeights / GetWeights with gRPC's default 4 MB message limit.
2. memory: the coordinator's peak RSS with 3 and with 8 workers on large-mlp (must not grow by a model per worker).
3. reference: 3 workers, 20 rounds, the reference CNN and hyper-parameters on 8,000 real MNIST digits (needs
   ../shared/data/mnist; skipped without it).
4. faults: 10 rounds on 3 workers, one killed (kill -9) in round 3 and restarted in round 5, against a fault-free
   run with the same seed (the real MNIST digits when ../shared is there, else the 5,000 shipped digits).
5. poison: 5 workers, one of them malicious (tests.poison_worker: huge values, an inflated sample count, a boosted,
   a sign-flipped and a random update), 5 rounds under every aggregation rule, against a clean run.
6. robust-memory: the coordinator's peak RSS with median and with FedAvg at 5 and 10 workers on large-mlp (median
   must not grow by a model per worker either).
7. scale: 3, 8 and 16 worker processes on this machine, reference CNN, one local batch a round: the round overhead
   (wall beyond the slowest worker's training) and the coordinator's peak RSS against N, beside a bare `import torch`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.wire import bare_torch_rss_mb, bench_wire
from coordinator_service.local import LocalCluster, LocalWorker, demo_cluster
from fedpi.models import build_model
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import SHARED_MNIST
from tests.integration.conftest import DIGITS, METADATA, events, run_coordinator


def _serving(cluster: LocalCluster) -> LocalCluster:
    asyncio.run(cluster.wait_serving(timeout=300))
    return cluster


def bench_transport(tmp: Path) -> None:
    with LocalCluster([LocalWorker("big", [*DIGITS, "--model", "large-mlp"], tmp)]) as cluster:
        _serving(cluster)
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(cluster.workers[0].address))
        payload = serde.WeightsPayload(build_model("large-mlp", seed=3).state_dict(), round=1, architecture="large-mlp")
        mb = payload.total_bytes / 1e6
        # A sha256 digest in the header (every protocol version), and an XXH3-128 one in a trailer (1.6 peers).
        for digest, chunk_size in (
            ("sha256", 256 << 10),
            ("sha256", 1 << 20),
            ("sha256", (4 << 20) - 4096),
            ("xxh3_128", 1 << 20),
        ):
            trailer = digest if digest != "sha256" else None
            up, down = [], []
            for _ in range(3):
                t = time.perf_counter()
                stub.SetWeights(payload.chunks(chunk_size, trailer=trailer), metadata=METADATA, timeout=300)
                up.append(time.perf_counter() - t)
                t = time.perf_counter()
                chunks = list(
                    stub.GetWeights(
                        pb.GetWeightsRequest(chunk_size=chunk_size, digest_in_trailer=bool(trailer), digests=[digest]),
                        metadata=METADATA,
                    )
                )
                down.append(time.perf_counter() - t)
                assert chunks[0].header.digest == (f"{digest}:" if trailer else payload.digest)
            print(
                f"transport  large-mlp {mb:.0f} MB  chunk {chunk_size >> 10:>5} KiB  {digest:<8}  "
                f"SetWeights {mb / statistics.median(up):6.0f} MB/s  GetWeights {mb / statistics.median(down):6.0f} MB/s"  # noqa: E501
            )


def bench_memory(tmp: Path) -> None:
    for n in (3, 8):
        args = [*DIGITS, "--model", "large-mlp"]
        with demo_cluster(n, args, tmp / f"w{n}") as cluster:
            _serving(cluster)
            proc = run_coordinator(
                "train",
                "--workers",
                cluster.spec,
                "--model",
                "large-mlp",
                "--rounds",
                "2",
                "--local-batches",
                "1",
                "--dataset",
                "digits-5k",
                "--min-workers",
                str(n),
                "--output-dir",
                str(tmp / f"out{n}"),
                timeout=1200,
            )
            finished = [e for e in events(proc.stdout) if e.get("event") == "training_finished"]
            if proc.returncode or not finished:
                sys.exit(f"memory benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            rounds = [e for e in events(proc.stdout) if e.get("event") == "round_finished"]
            print(
                f"memory     large-mlp 105 MB  {n} workers  coordinator peak RSS {finished[0]['peak_rss_mb']:.0f} MB"
                f"  round wall {rounds[-1]['wall_seconds']:.1f} s  aggregation {rounds[-1]['aggregation_seconds']:.2f} s"  # noqa: E501
            )


def bench_reference(tmp: Path) -> None:
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"reference  skipped: no MNIST digits at {SHARED_MNIST}")
        return
    out = tmp / "reference"
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
        "--output-dir",
        str(out),
        timeout=3600,
    )
    if proc.returncode:
        sys.exit(f"reference benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_seconds"] for r in rounds[1:]]
    overheads = [r["overhead_seconds"] for r in rounds[1:]]
    for r in rounds:
        if r["round"] in (1, 2, 5, 10, 14, 20):
            print(
                f"reference  round {r['round']:>2}  test accuracy {r['test_accuracy']:.2%}  wall {r['wall_seconds']:.2f} s"  # noqa: E501
            )
    print(
        f"reference  mnist-10k 8,000/2,000  3 workers  20 rounds  final accuracy {rounds[-1]['test_accuracy']:.2%}  "
        f"median round wall {statistics.median(walls):.2f} s  median overhead {statistics.median(overheads):.2f} s "
        f"(rounds 2-20)"
    )


def bench_faults(tmp: Path) -> None:
    from tests.integration.faults import CoordinatorRun

    if (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        data = ["--dataset", "mnist-10k", "--data-dir", str(SHARED_MNIST)]
    else:
        data = ["--dataset", "digits-5k"]
    worker_args = [*data, "--no-download", "--threads", "1"]
    results = {}
    for scenario in ("fault-free", "killed"):
        with demo_cluster(3, worker_args, tmp / scenario) as cluster:
            _serving(cluster)
            run = CoordinatorRun(
                "train",
                "--preset",
                "seed",
                "--workers",
                cluster.spec,
                "--rounds",
                "10",
                *data,
                "--seed",
                "7",
                "--min-workers",
                "2",
                "--handshake-timeout",
                "3",
                "--output-dir",
                str(tmp / scenario / "out"),
            )
            try:
                if scenario == "killed":
                    victim = cluster.workers[2]
                    run.wait_for("round_started", round=3, timeout=600)
                    run.wait_for("worker_train_finished", round=3, timeout=600)
                    victim.kill()
                    run.wait_for("round_started", round=5, timeout=600)
                    victim.start()
                if run.finish(1800):
                    sys.exit(f"faults benchmark failed:\n{''.join(run.lines[-40:])}")
            finally:
                run.proc.kill()
            results[scenario] = run.rounds()
    killed = results["killed"]
    for r in killed:
        print(
            f"faults     round {r['round']:>2}  workers {','.join(sorted(r['workers'])):<20}  "
            f"failures {','.join(f['worker'] + ':' + f['phase'] for f in r['failures']) or '-':<16}  "
            f"accuracy {r['test_accuracy']:.2%}  (fault-free {results['fault-free'][r['round'] - 1]['test_accuracy']:.2%})"  # noqa: E501
        )
    a, b = results["fault-free"][-1]["test_accuracy"], killed[-1]["test_accuracy"]
    print(
        f"faults     {data[1]}  10 rounds: fault-free {a:.2%}, worker killed in round 3 and restarted in round 5 "
        f"{b:.2%}: difference {abs(a - b) * 100:.2f} points"
    )


POISON_ATTACKS = ("huge", "inflate", "scaled:40", "sign-flip:20", "random:40")
RULES = ("fedavg", "median", "trimmed-mean", "clipped")


def bench_poison(tmp: Path) -> None:
    honest = ["alice", "bob", "charlie", "dave"]
    workers = [LocalWorker(n, [*DIGITS, "--partition", f"{i}/5"], tmp) for i, n in enumerate(honest)]
    workers.append(LocalWorker("mallory", [*DIGITS, "--partition", "4/5"], tmp))
    for attack in POISON_ATTACKS:
        workers.append(
            LocalWorker(
                f"mallory-{attack}",
                [*DIGITS, "--partition", "4/5", "--attack", attack],
                tmp,
                module="tests.poison_worker",
            )
        )
    train = [
        "--rounds",
        "5",
        "--dataset",
        "digits-5k",
        "--local-batches",
        "20",
        "--lr",
        "0.05",
        "--momentum",
        "0.5",
        "--min-workers",
        "3",
        "--seed",
        "3",
        # as these rows were measured: a constant rate, no distillation (the attacks, not the defaults, are measured)
        "--lr-schedule",
        "constant",
        "--not-true-distillation",
        "0",
    ]

    def run(fifth: str, rule: str) -> str:
        spec = ",".join(f"{n}={w.address}" for n, w in zip(honest, workers)) + f",mallory={by_name[fifth].address}"
        proc = run_coordinator(
            "train",
            "--workers",
            spec,
            *train,
            "--aggregation",
            rule,
            "--output-dir",
            str(tmp / f"{fifth}-{rule}"),
            timeout=1200,
        )
        rounds = [e for e in events(proc.stdout) if e.get("event") == "round_finished"]
        refused = sum(1 for r in rounds for f in r["failures"] if f["worker"] == "mallory")
        if proc.returncode:
            return f"run failed after {len(rounds)} rounds (updates refused, quorum lost)"
        return f"accuracy {rounds[-1]['test_accuracy']:.2%}  mallory refused in {refused}/{len(rounds)} rounds"

    by_name = {w.name: w for w in workers}
    with LocalCluster(workers) as cluster:
        _serving(cluster)
        print(f"poison     5 workers, digits-5k, 5 rounds  clean fedavg: {run('mallory', 'fedavg')}")
        for attack in POISON_ATTACKS:
            for rule in RULES:
                print(f"poison     {attack:<12} {rule:<13} {run('mallory-' + attack, rule)}")


def bench_robust_memory(tmp: Path) -> None:
    for n in (5, 10):
        args = [*DIGITS, "--model", "large-mlp"]
        with demo_cluster(n, args, tmp / f"w{n}") as cluster:
            _serving(cluster)
            for rule in ("fedavg", "median"):
                proc = run_coordinator(
                    "train",
                    "--workers",
                    cluster.spec,
                    "--model",
                    "large-mlp",
                    "--rounds",
                    "1",
                    "--local-batches",
                    "1",
                    "--dataset",
                    "digits-5k",
                    "--min-workers",
                    str(n),
                    "--aggregation",
                    rule,
                    "--output-dir",
                    str(tmp / f"out{n}{rule}"),
                    timeout=1800,
                )
                finished = [e for e in events(proc.stdout) if e.get("event") == "training_finished"]
                if proc.returncode or not finished:
                    sys.exit(f"robust-memory benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
                [r] = [e for e in events(proc.stdout) if e.get("event") == "round_finished"]
                print(
                    f"robust-memory  large-mlp 105 MB  {n:>2} workers  {rule:<7} coordinator peak RSS "
                    f"{finished[0]['peak_rss_mb']:.0f} MB  round wall {r['wall_seconds']:.1f} s  "
                    f"aggregation {r['aggregation_seconds']:.2f} s"
                )


def bench_scale(tmp: Path) -> None:
    print(f"scale      bare `import torch`: peak RSS {bare_torch_rss_mb():.0f} MB")
    for n in (3, 8, 16):
        with demo_cluster(n, DIGITS, tmp / f"w{n}") as cluster:
            _serving(cluster)
            proc = run_coordinator(
                "train",
                "--workers",
                cluster.spec,
                "--rounds",
                "6",
                "--local-batches",
                "1",
                "--dataset",
                "digits-5k",
                "--min-workers",
                str(n),
                "--output-dir",
                str(tmp / f"out{n}"),
                timeout=1800,
            )
            finished = [e for e in events(proc.stdout) if e.get("event") == "training_finished"]
            if proc.returncode or not finished:
                sys.exit(f"scale benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            rounds = [e for e in events(proc.stdout) if e.get("event") == "round_finished"][1:]  # round 1 warms up
            overhead = statistics.median(r["overhead_seconds"] for r in rounds)
            wall = statistics.median(r["wall_seconds"] for r in rounds)
            print(
                f"scale      reference-cnn  {n:>2} workers  median round wall {wall:.3f} s  overhead {overhead:.3f} s "
                f"(rounds 2-6; evaluation beside the next round)  coordinator peak RSS "
                f"{finished[0]['peak_rss_mb']:.0f} MB"
            )


BENCHES = {
    "wire": bench_wire,
    "transport": bench_transport,
    "memory": bench_memory,
    "reference": bench_reference,
    "faults": bench_faults,
    "poison": bench_poison,
    "robust-memory": bench_robust_memory,
    "scale": bench_scale,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"which to run: {', '.join(BENCHES)} (default: all)")
    args = p.parse_args()
    unknown = set(args.names) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names or BENCHES:
            BENCHES[name](Path(tmp) / name)


if __name__ == "__main__":
    main()
