"""Learning benchmarks: `make bench-learning` prints the tables in docs/benchmarks.md (Learning).

1. table: 3 local workers train each strategy on each partition of a real dataset (IID for 20 rounds, the `labels`
   split and Dirichlet alpha=0.1 for 40), the coordinator evaluating on the held-out test split every round. Prints
   the final test accuracy, its spread over the last 5 rounds and the first round that reached the target accuracy
   (`--strategies 2,3` runs only those rows; `--seeds 0,1,2` gives the mean over those seeds, then each one's).
   Datasets: the 8,000 / 2,000 real MNIST digits in ../shared/data/mnist (mnist-10k) and Debian's Fashion-MNIST
   (60,000 / 10,000), each skipped with a message where it is not installed.
2. agreement: round 1 of the defaults on each split, with 3 and 10 local workers; prints the update agreement that
   `--server-optimizer auto` chooses FedAvg or FedDyn by (docs/guide.md, Server optimizers).
3. mixed: a mixed cluster on an emulated Pi LAN (../shared/tools/pilan, 100 Mbit/s): two Pi 4s (15% of a core) and
   a Pi 5 (30%). Ten minutes of wall clock with a fixed number of local batches, then ten with a time budget per
   round (--local-seconds) and FedNova; test accuracy after 1, 2, 5 and 10 minutes of rounds (the sum of their
   walls) and the median round wall.

    python -m bench.learning [table] [agreement] [mixed] [--datasets mnist-10k,fashion-mnist] [--strategies 1,2]
        [--seeds 0] [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import pilan
from coordinator_service.local import LocalCluster, LocalWorker
from fedpi.data import DEBIAN_FASHION_MNIST
from tests.conftest import ROOT, SHARED_MNIST


@dataclass(frozen=True)
class Setting:
    name: str
    args: tuple[str, ...]


# Each strategy as its paper runs it, on top of the defaults unless it says otherwise (docs/guide.md: Strategies).
CONSTANT = ("--lr-schedule", "constant")  # with 50 batches: the rows measured before the current defaults
B50 = ("--local-batches", "50")
FEDAVG = ("--server-optimizer", "fedavg")  # the rows measured before auto became the default
NTD1 = ("--not-true-distillation", "1")  # and before beta 0.5 did
STRATEGIES = (
    Setting("FedAvg (seed config)", ("--preset", "seed")),
    Setting("The defaults (auto: FedAvg, or FedDyn when round 1's updates disagree)", ()),
    Setting(
        "FedAvg, constant lr, no distillation (the earlier defaults)",
        ("--not-true-distillation", "0", *CONSTANT, *B50, *FEDAVG),
    ),
    Setting(
        "FedAvgM (local momentum 0.5, lr 0.02)",
        (
            "--momentum",
            "0.5",
            "--lr",
            "0.02",
            "--server-optimizer",
            "fedavgm",
            "--not-true-distillation",
            "0",
            *CONSTANT,
        ),
    ),
    Setting(
        "FedAvgM, 10 local batches",
        (
            "--momentum",
            "0.5",
            "--lr",
            "0.02",
            "--local-batches",
            "10",
            "--server-optimizer",
            "fedavgm",
            "--not-true-distillation",
            "0",
            *CONSTANT,
        ),
    ),
    Setting("FedAdam", ("--server-optimizer", "fedadam", "--not-true-distillation", "0", *CONSTANT, *B50)),
    Setting("FedProx", ("--proximal-mu", "0.01", "--not-true-distillation", "0", *CONSTANT, *B50)),
    Setting("Not-true distillation, 50 batches, lr decay 0.95", ("--lr-decay", "0.95", *B50, *FEDAVG, *NTD1)),
    Setting(
        "Not-true distillation, 50 batches, constant lr (the defaults before these)", (*CONSTANT, *B50, *FEDAVG, *NTD1)
    ),
    Setting("The defaults without distillation", ("--not-true-distillation", "0", *FEDAVG)),
    Setting("FedDyn (alpha 0.1) from round 1, not-true distillation beta 1", ("--server-optimizer", "feddyn", *NTD1)),
    Setting("FedAvg, not-true distillation beta 1 (the defaults before auto)", (*FEDAVG, *NTD1)),
)
PARTITIONS = (
    Setting("iid, 20 rounds", ("--partition-scheme", "iid", "--rounds", "20")),
    Setting("labels, 40 rounds", ("--partition-scheme", "labels", "--rounds", "40")),
    Setting(
        "dirichlet 0.1, 40 rounds", ("--partition-scheme", "dirichlet", "--partition-alpha", "0.1", "--rounds", "40")
    ),
)


@dataclass(frozen=True)
class Data:
    name: str
    args: tuple[str, ...]
    target: float  # the accuracy whose first round the table reports
    available: bool
    missing: str


DATASETS = {
    "mnist-10k": Data(
        "MNIST, 8,000 / 2,000 real digits",
        ("--dataset", "mnist-10k", "--data-dir", str(SHARED_MNIST)),
        0.95,
        (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
        f"no MNIST digits at {SHARED_MNIST}",
    ),
    "fashion-mnist": Data(
        "Fashion-MNIST, 60,000 / 10,000",
        ("--dataset", "fashion-mnist"),
        0.85,
        (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
        or (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte").is_file(),
        "Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
    ),
}


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _demo(out: Path, *args: str, workers: int = 3, timeout: float = 3600) -> list[dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "demo",
            "--local-workers",
            str(workers),
            "--no-download",
            "--output-dir",
            str(out),
            "--log-format",
            "json",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        sys.exit(f"learning benchmark failed ({' '.join(args)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return _metrics(out)


def _first_round(metrics: list[dict], target: float) -> str:
    return next((str(m["round"]) for m in metrics if m["test_accuracy"] >= target), "-")


def _cell(runs: list[list[dict]], target: float) -> str:
    """Final accuracy, the spread (max - min) over the last 5 rounds in points, and the first round at the target:
    of the run, or with several seeds of the mean accuracy per round, followed by each seed's final accuracy."""
    curve = [
        {"round": ms[0]["round"], "test_accuracy": statistics.fmean(m["test_accuracy"] for m in ms)}
        for ms in zip(*runs)
    ]
    last = [m["test_accuracy"] for m in curve[-5:]]
    spread = (max(last) - min(last)) * 100
    finals = ", ".join(f"{r[-1]['test_accuracy']:.2%}" for r in runs)
    seeds = f" [{finals}]" if len(runs) > 1 else ""
    return f"{last[-1]:.2%} ±{spread:.2f} ({_first_round(curve, target)}){seeds}"


def bench_table(tmp: Path, datasets: list[str], strategies: list[Setting], seeds: list[int]) -> None:
    for key in datasets:
        data = DATASETS[key]
        if not data.available:
            print(f"learning  {key} skipped: {data.missing}")
            continue
        print(
            f"\n{data.name}, 3 workers, one local epoch of batches of 64 per round unless the row says otherwise; "
            f"final "
            f"test accuracy, ± its spread over the last 5 rounds in points (first round at >= {data.target:.0%})"
            + (f"; the mean over seeds {', '.join(map(str, seeds))}, then each seed's" if len(seeds) > 1 else "")
            + "\n"
        )
        print("| strategy | " + " | ".join(p.name for p in PARTITIONS) + " |")
        print("|---|" + "---|" * len(PARTITIONS))
        for strategy in strategies:
            cells = []
            for partition in PARTITIONS:
                runs = []
                for seed in seeds:
                    out = tmp / key / f"{strategy.name}-{partition.name}-{seed}".replace(" ", "_")
                    runs.append(_demo(out, *data.args, *partition.args, "--seed", str(seed), *strategy.args))
                cells.append(_cell(runs, data.target))
            print(f"| {strategy.name} | " + " | ".join(cells) + " |", flush=True)


def bench_agreement(tmp: Path, datasets: list[str]) -> None:
    """Round 1 of the defaults on each split: the update agreement `--server-optimizer auto` chooses by."""
    print("\nUpdate agreement of round 1 (the defaults; auto turns FedDyn on below 0.4)\n")
    print("| data | split | 3 workers | 10 workers |")
    print("|---|---|---|---|")
    for key in datasets:
        data = DATASETS[key]
        if not data.available:
            print(f"learning  {key} skipped: {data.missing}")
            continue
        for partition in PARTITIONS:
            cells = []
            for workers in (3, 10):
                out = tmp / key / f"{partition.name}-{workers}".replace(" ", "_")
                [first] = _demo(out, *data.args, *partition.args, "--rounds", "1", workers=workers)
                cells.append(f"{first['update_agreement']:.2f}")
            split = partition.name.split(",")[0]
            print(f"| {data.name.split(',')[0]} | {split} | " + " | ".join(cells) + " |", flush=True)


# -- mixed cluster on an emulated Pi LAN --------------------------------------------------------------------------

BOARDS = (("pi4-a", 15), ("pi4-b", 15), ("pi5", 30))  # name, % of one core (pilan's calibration)


def _pi_workers(tmp: Path, names: Sequence[str] = tuple(n for n, _ in BOARDS), *extra: str) -> list[LocalWorker]:
    """A worker per board, Pi i holding shard i of the MNIST digits (`extra`: more worker flags, e.g. the split)."""
    data = ["--dataset", "mnist-10k", "--data-dir", str(SHARED_MNIST), "--no-download", "--threads", "1"]
    return [
        pilan.pi_worker(i, name, [*data, "--partition", f"{i - 1}/{len(names)}", *extra], tmp)
        for i, name in enumerate(names, 1)
    ]


def _timed_run(tmp: Path, name: str, spec: str, minutes: float, *args: str) -> list[dict]:
    """Train until `minutes` of wall clock have passed, then stop the coordinator (its metrics stay)."""
    out = tmp / name
    cmd = [
        sys.executable,
        "-m",
        "coordinator_service",
        "train",
        "--workers",
        spec,
        "--rounds",
        "10000",
        "--dataset",
        "mnist-10k",
        "--data-dir",
        str(SHARED_MNIST),
        "--no-download",
        "--output-dir",
        str(out),
        "--log-format",
        "json",
        *args,
    ]
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(minutes * 60)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGINT: a benchmark started in the background ignores SIGINT, and so do its children. The
            # rounds finished by then are in metrics.jsonl (each written whole).
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return _metrics(out)


def _accuracy_at(metrics: list[dict], seconds: float) -> str:
    clock, accuracy = 0.0, None
    for m in metrics:
        clock += m["wall_seconds"]
        if clock > seconds:
            break
        accuracy = m["test_accuracy"]
    return f"{accuracy:.2%}" if accuracy is not None else "-"


def bench_mixed(tmp: Path, minutes: float) -> None:
    if not pilan.available():
        print(f"mixed  skipped: needs root and pilan at {pilan.PILAN}")
        return
    if not DATASETS["mnist-10k"].available:
        print(f"mixed  skipped: {DATASETS['mnist-10k'].missing}")
        return
    with pilan.lan(len(BOARDS), cpu_pct=BOARDS[0][1]):
        for i, (_, pct) in enumerate(BOARDS, 1):
            pilan.set_cpu_share(i, pct)
        # Local work against time budgets, nothing else: distillation off and a constant rate in both, as when these
        # rows were measured (a run stopped by the clock has no last round for a schedule to aim at).
        plain = ("--not-true-distillation", "0", *CONSTANT, *FEDAVG)
        settings = (
            Setting("50 batches per round, FedAvg", ("--local-batches", "50", *plain)),
            Setting("--local-seconds 5, FedNova", ("--local-seconds", "5", *plain)),
        )
        print(
            f"\nmixed cluster on pilan (100 Mbit/s): {', '.join(f'{n} {p}% CPU' for n, p in BOARDS)}; "
            f"MNIST 8,000 / 2,000 iid, {' '.join(plain)}; {minutes:g} minutes each\n"
        )
        marks = [m for m in (1, 2, 5) if m < minutes] + [minutes]
        print(
            "| local work | rounds | median round wall | batches per round (pi4 / pi5) | test accuracy after "
            + " / ".join(f"{m:g}" for m in marks)
            + " min of rounds |"
        )
        print("|---|---|---|---|---|")
        for setting in settings:
            with LocalCluster(_pi_workers(tmp / "workers")) as cluster:
                asyncio.run(cluster.wait_serving(timeout=300))
                spec = ",".join(f"{w.name}={w.address}" for w in cluster.workers)
                metrics = _timed_run(tmp, setting.name.split(",")[0].replace(" ", "_"), spec, minutes, *setting.args)
            walls = [m["wall_seconds"] for m in metrics]
            batches = [
                statistics.median(m["workers"][n]["batches"] for m in metrics if n in m["workers"])
                for n in ("pi4-a", "pi5")
            ]
            print(
                f"| {setting.name} | {len(metrics)} | {statistics.median(walls):.1f} s | "
                f"{batches[0]:.0f} / {batches[1]:.0f} | "
                + " / ".join(_accuracy_at(metrics, m * 60) for m in marks)
                + " |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="which to run: table, agreement, mixed (default: all three)")
    p.add_argument("--datasets", default="mnist-10k,fashion-mnist", help="for table: comma-separated")
    p.add_argument("--strategies", help="for table: comma-separated row numbers, from 1 (default: all)")
    p.add_argument("--seeds", default="0", help="for table: comma-separated seeds; a cell gives their mean")
    p.add_argument("--minutes", type=float, default=10.0, help="for mixed: wall clock per configuration")
    p.add_argument("--keep", help="keep every run's output in this directory")
    args = p.parse_args()
    known = {"table", "agreement", "mixed"}
    if set(args.names) - known:
        p.error(f"unknown benchmark {', '.join(sorted(set(args.names) - known))}; choose from {', '.join(known)}")
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        p.error(f"unknown dataset {', '.join(sorted(unknown))}; choose from {', '.join(DATASETS)}")
    rows = [int(n) for n in args.strategies.split(",")] if args.strategies else range(1, len(STRATEGIES) + 1)
    if not set(rows) <= set(range(1, len(STRATEGIES) + 1)):
        p.error(f"--strategies: rows are numbered 1 to {len(STRATEGIES)}")
    strategies = [STRATEGIES[n - 1] for n in rows]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        if "table" in args.names or not args.names:
            bench_table(out / "table", datasets, strategies, [int(n) for n in args.seeds.split(",")])
        if "agreement" in args.names or not args.names:
            bench_agreement(out / "agreement", datasets)
        if "mixed" in args.names or not args.names:
            bench_mixed(out / "mixed", args.minutes)


if __name__ == "__main__":
    main()
