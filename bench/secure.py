"""What secure aggregation costs (`make bench-secure`).

The same runs with and without --secure-aggregation, same seed, same workers:
1. loopback, reference CNN, 5 workers (digits-5k, 5 rounds of 10 batches): the median round wall and overhead, the
   bytes each worker sent back a round, the final accuracy, and the largest difference between the two final models.
2. loopback, large-mlp (105 MB), 5 and 10 workers, 2 rounds of one batch: the round wall and the coordinator's peak
   RSS, which must stay flat from 5 to 10 workers.
3. an emulated Pi LAN (../shared/tools/pilan: 5 Pi 4s at 15% of a core, 100 Mbit/s; needs root), the reference CNN
   on the real MNIST digits and large-mlp: the round wall with and without, and their ratio (goal: at most 1.25).

    python -m bench.secure [loopback] [memory] [pilan] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench import pilan
from bench.learning import _pi_workers
from coordinator_service.local import LocalCluster, demo_cluster
from tests.conftest import SHARED_MNIST
from tests.integration.conftest import DIGITS, events, run_coordinator

SECURE = ("--secure-aggregation",)
MODES = (("plain", ()), ("secure", SECURE))


def _serving(cluster: LocalCluster) -> LocalCluster:
    asyncio.run(cluster.wait_serving(timeout=600))
    return cluster


def _train(out: Path, spec: str, *args: str, timeout: float = 3600) -> tuple[list[dict], dict]:
    proc = run_coordinator("train", "--workers", spec, "--output-dir", str(out), *args, timeout=timeout)
    finished = [e for e in events(proc.stdout) if e.get("event") == "training_finished"]
    if proc.returncode or not finished:
        sys.exit(f"secure-aggregation benchmark failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rounds, finished[0]


def _received_mb(rounds: list[dict]) -> float:
    per_worker = [w["bytes_received"] for r in rounds for w in r["workers"].values()]
    return statistics.median(per_worker) / 1e6


def _max_difference(a: Path, b: Path) -> float:
    x, y = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def _wall(rounds: list[dict]) -> float:
    return statistics.median(r["wall_seconds"] for r in rounds)


def bench_loopback(tmp: Path) -> None:
    args = ["--rounds", "5", "--local-batches", "10", "--dataset", "digits-5k", "--min-workers", "5"]
    print("\nloopback, reference CNN (431,080 parameters), 5 workers, 5 rounds of 10 batches\n")
    print("| run | median round wall | median overhead | MB back per worker a round | final accuracy |")
    print("|---|---|---|---|---|")
    with demo_cluster(5, DIGITS, tmp / "workers-cnn") as cluster:
        _serving(cluster)
        for name, extra in MODES:
            rounds, _ = _train(tmp / f"cnn-{name}", cluster.spec, *args, *extra)
            overhead = statistics.median(r["overhead_seconds"] for r in rounds)
            print(f"| {name} | {_wall(rounds):.2f} s | {overhead:.3f} s | {_received_mb(rounds):.2f} | "
                  f"{rounds[-1]['test_accuracy']:.2%} |", flush=True)  # fmt: skip
    print(
        f"\nlargest difference between the final models: {_max_difference(tmp / 'cnn-plain', tmp / 'cnn-secure'):.2e}"
    )


def bench_memory(tmp: Path) -> None:
    args = ["--model", "large-mlp", "--rounds", "2", "--local-batches", "1", "--dataset", "digits-5k"]
    print("\nloopback, large-mlp (105 MB), 2 rounds of one batch\n")
    print("| workers | run | round wall (last) | aggregation | coordinator peak RSS |")
    print("|---|---|---|---|---|")
    for n in (5, 10):
        with demo_cluster(n, [*DIGITS, "--model", "large-mlp"], tmp / f"workers-mlp{n}") as cluster:
            _serving(cluster)
            for name, extra in MODES:
                rounds, finished = _train(tmp / f"mlp{n}-{name}", cluster.spec, *args, "--min-workers", str(n),
                                          *extra, timeout=3600)  # fmt: skip
                last = rounds[-1]
                print(f"| {n} | {name} | {last['wall_seconds']:.1f} s | {last['aggregation_seconds']:.2f} s | "
                      f"{finished['peak_rss_mb']:.0f} MB |", flush=True)  # fmt: skip


def bench_pilan(tmp: Path) -> None:
    if not pilan.available():
        print("pilan      skipped: needs root and ../shared/tools/pilan")
        return
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"pilan      skipped: no MNIST digits at {SHARED_MNIST}")
        return
    names = [f"pi4-{i}" for i in range(1, 6)]
    data = ("--dataset", "mnist-10k", "--data-dir", str(SHARED_MNIST), "--no-download")
    runs = (
        ("reference CNN, 3 rounds of 20 batches", (), ("--rounds", "3", "--local-batches", "20")),
        ("large-mlp 105 MB, 2 rounds of one batch", ("--model", "large-mlp"),
         ("--model", "large-mlp", "--rounds", "2", "--local-batches", "1")),
    )  # fmt: skip
    print("\nemulated Pi LAN: 5 Pi 4s (15% of a core each), 100 Mbit/s links, real MNIST digits\n")
    print("| model | plain round wall | secure round wall | secure / plain |")
    print("|---|---|---|---|")
    for label, worker_args, train_args in runs:
        with pilan.lan(len(names), "100mbit", 15):
            with LocalCluster(_pi_workers(tmp, names, *worker_args)) as cluster:
                _serving(cluster)
                walls = {}
                for name, extra in MODES:
                    out = tmp / f"pi-{label[:9]}-{name}".replace(" ", "_")
                    rounds, _ = _train(out, cluster.spec, *data, *train_args, "--min-workers", "5",
                                       "--round-timeout", "1800", *extra)  # fmt: skip
                    walls[name] = _wall(rounds)
        print(f"| {label} | {walls['plain']:.1f} s | {walls['secure']:.1f} s | "
              f"{walls['secure'] / walls['plain']:.2f} |", flush=True)  # fmt: skip


def worker_timing(model: str, neighbours: int) -> dict[str, float]:
    """One worker's secure-aggregation work for a round of `model`, timed stage by stage: keys, shares for its
    neighbours, and its masked update (quantising and masking every parameter) as GetMaskedUpdate streams it; then
    the same masked update with distributed DP (the norm, and Skellam noise on every integer)."""
    import time

    from fedpi.models import build_model
    from generated.fedpi.v1 import worker_pb2 as pb
    from worker_service.secagg import Session

    state = build_model(model, seed=1).state_dict()
    deltas = [t.detach().reshape(-1).double().numpy() * 1e-3 for t in state.values() if t.is_floating_point()]
    coordinates = sum(len(d) for d in deltas)
    n = neighbours + 1

    def config(i: int, **dp) -> pb.SecAggConfig:
        return pb.SecAggConfig(round_id="t/1.1", index=i, neighbours=[j for j in range(1, n + 1) if j != i],
                               threshold=n // 2 + 1, clip=1.0, workers=n, **{"max_weight": 640, **dp})  # fmt: skip

    others = [Session(config(i)) for i in range(1, n + 1)]
    keys = {s.me: s.public_keys() for s in others}
    me = others[0]
    times = {}
    t = time.perf_counter()
    me.public_keys()
    Session(me.config)  # two fresh X25519 key pairs
    times["keys"] = time.perf_counter() - t
    peers = [pb.PeerKeys(index=j, cipher_public_key=k.cipher_public_key, mask_public_key=k.mask_public_key)
             for j, k in keys.items() if j != 1]  # fmt: skip
    t = time.perf_counter()
    me.shares(peers)
    times["shares"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in me.masked_update([p.index for p in peers], lambda: deltas, coordinates, 640, 1 << 20):
        pass
    times["masked_update"] = time.perf_counter() - t
    noised = Session(config(1, max_weight=1, unweighted=True, dp_clip_norm=1.0, dp_noise_multiplier=1.0,
                            dp_survivors=n // 2 + 1, coordinates=coordinates, dp_count_stddev=1.0))  # fmt: skip
    noised.shares(peers)
    t = time.perf_counter()
    for _ in noised.masked_update([p.index for p in peers], lambda: deltas, coordinates, 1, 1 << 20):
        pass
    times["masked_update_dp"] = time.perf_counter() - t
    return times


def bench_pi_timing(tmp: Path) -> None:
    """worker_timing on one emulated Pi 4 (15% of a core), for the reference CNN and large-mlp."""
    if not pilan.available():
        print("pi-timing  skipped: needs root and ../shared/tools/pilan")
        return
    import subprocess

    from tests.conftest import ROOT

    print("\none worker's secure-aggregation work a round at a Pi 4's CPU share (pilan, 15% of a core), 4 neighbours\n")
    print("| model | keys | shares | masked update (quantise + 5 masks) | the same with distributed DP |")
    print("|---|---|---|---|---|")
    with pilan.lan(1, "none", 15):
        for model in ("reference-cnn", "large-mlp"):
            code = (
                f"import json; from bench.secure import worker_timing; print(json.dumps(worker_timing({model!r}, 4)))"
            )
            env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
            argv = [str(pilan.PILAN), "exec", "1", sys.executable, "-c", code]
            out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {model} | {t['keys'] * 1e3:.1f} ms | {t['shares'] * 1e3:.1f} ms | {t['masked_update']:.2f} s | "
                  f"{t['masked_update_dp']:.2f} s |", flush=True)  # fmt: skip


BENCHES = {
    "loopback": bench_loopback,
    "memory": bench_memory,
    "pilan": bench_pilan,
    "pi-timing": bench_pi_timing,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="*", help=f"any of {', '.join(BENCHES)} (default: all)")
    p.add_argument("--keep", type=Path, help="keep the runs' output here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpi-bench-secure-") as scratch:
        tmp = args.keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.which or BENCHES:
            if name not in BENCHES:
                sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
            BENCHES[name](tmp)


if __name__ == "__main__":
    main()
