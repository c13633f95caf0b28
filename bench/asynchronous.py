"""Asynchronous against synchronous rounds on an emulated Pi LAN (`make bench-async`).

Four boards on ../shared/tools/pilan: two Pi 4s (15% of a core), a Pi 5 (30%) and a Pi 4 held back to 5% of a core
behind a 20 Mbit/s link; the real MNIST digits of ../shared/data/mnist (8,000 / 2,000), split IID and by labels.
Each configuration trains for the same wall clock: sync FedAvg with a fixed number of local batches, sync with a time
budget (--local-seconds) and FedNova, and --mode async (FedBuff) with the same fixed batches. All with a constant
learning rate: a run stopped by the clock has no last round for a schedule to aim at.

Prints, per split and configuration: rounds (versions), the minutes of wall clock to 97% and 98% test accuracy, the
final accuracy, and every board's idle fraction (sync: the share of each round it did not train, waiting for the
slowest; async: the share of the run it spent neither training nor moving weights). Writes accuracy against wall
clock, one plot per split, into the output directory.

    python -m bench.asynchronous [--minutes 15] [--splits iid,labels] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench import pilan
from bench.learning import DATASETS, Setting, _pi_workers, _timed_run
from coordinator_service.local import LocalCluster, LocalWorker

# name, % of one core, link rate, CPU period (µs; a share under 10% needs 100 ms)
BOARDS = (
    ("pi4-a", 15, "100mbit", None),
    ("pi4-b", 15, "100mbit", None),
    ("pi5", 30, "100mbit", None),
    ("pi4-slow", 5, "20mbit", 100_000),
)
COMMON = ("--lr-schedule", "constant", "--min-workers", "1", "--round-timeout", "900")
SETTINGS = (
    Setting("sync FedAvg, 30 batches", ("--local-batches", "30", *COMMON)),
    Setting("sync, --local-seconds 5, FedNova", ("--local-seconds", "5", *COMMON)),
    Setting("async (FedBuff, buffer 2), 30 batches", ("--mode", "async", "--local-batches", "30", *COMMON)),
)
TARGETS = (0.97, 0.98)


def _workers(tmp: Path, split: str) -> list[LocalWorker]:
    return _pi_workers(tmp, [name for name, *_ in BOARDS], "--partition-scheme", split)


def _clock(metrics: list[dict]) -> list[tuple[float, float]]:
    """(minutes of wall clock, test accuracy) after each round or version."""
    out, clock = [], 0.0
    for m in metrics:
        clock += m["wall_seconds"]
        out.append((clock / 60, m["test_accuracy"]))
    return out


def _minutes_to(points: list[tuple[float, float]], target: float) -> str:
    return next((f"{t:.1f}" for t, acc in points if acc >= target), "-")


def _idle(metrics: list[dict]) -> dict[str, float]:
    if metrics and "idle_fraction" in metrics[-1]:
        return metrics[-1]["idle_fraction"]
    idle = {}
    for name, *_ in BOARDS:
        rounds = [m for m in metrics if name in m["workers"]]
        wall = sum(m["wall_seconds"] for m in rounds)
        idle[name] = 1 - sum(m["workers"][name]["train_seconds"] for m in rounds) / wall if wall else 1.0
    return idle


def _plot(path: Path, split: str, curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in curves.items():
        ax.plot([t for t, _ in points], [100 * a for _, a in points], label=name)
    for target in TARGETS:
        ax.axhline(100 * target, color="grey", linewidth=0.6, linestyle=":")
    ax.set(xlabel="minutes of wall clock", ylabel="test accuracy (%)", ylim=(90, 100),
           title=f"MNIST {split} on an emulated Pi LAN: " + ", ".join(f"{n} {p}%" for n, p, *_ in BOARDS))  # fmt: skip
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(out: Path, minutes: float, splits: list[str]) -> None:
    if not pilan.available():
        print(f"async  skipped: needs root and pilan at {pilan.PILAN}")
        return
    if not DATASETS["mnist-10k"].available:
        print(f"async  skipped: {DATASETS['mnist-10k'].missing}")
        return
    out.mkdir(parents=True, exist_ok=True)
    boards = ", ".join(f"{n} {p}% CPU {r}" for n, p, r, _ in BOARDS)
    print(f"\nasync vs sync on pilan: {boards}; MNIST 8,000 / 2,000; {minutes:g} minutes each\n")
    print("| split | configuration | rounds | min to 97% | min to 98% | final | idle " + " / ".join(
        n for n, *_ in BOARDS) + " |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with pilan.lan(len(BOARDS), cpu_pct=BOARDS[0][1]):
        for i, (_, pct, rate, period) in enumerate(BOARDS, 1):
            pilan.set_cpu_share(i, pct, period)
            pilan.set_rate(i, rate)
        for split in splits:
            curves = {}
            for setting in SETTINGS:
                with LocalCluster(_workers(out / "workers", split)) as cluster:
                    asyncio.run(cluster.wait_serving(timeout=300))
                    spec = ",".join(f"{w.name}={w.address}" for w in cluster.workers)
                    name = f"{split}-{setting.name.split(',')[0].replace(' ', '_')}"
                    metrics = _timed_run(out, name, spec, minutes, *setting.args)
                points = curves[setting.name] = _clock(metrics)
                idle = _idle(metrics)
                print(
                    f"| {split} | {setting.name} | {len(metrics)} | {_minutes_to(points, 0.97)} | "
                    f"{_minutes_to(points, 0.98)} | {points[-1][1]:.2%} | "
                    + " / ".join(f"{100 * idle.get(n, 1.0):.1f}%" for n, *_ in BOARDS)
                    + " |",
                    flush=True,
                )
            _plot(out / f"async-{split}.png", split, curves)
    print(f"\nplots: {', '.join(str(out / f'async-{s}.png') for s in splits)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="wall clock per configuration")
    p.add_argument("--splits", default="iid,labels", help="comma-separated: iid, labels, dirichlet")
    p.add_argument("--keep", help="write every run's output and the plots here (default: a temporary directory)")
    args = p.parse_args()
    splits = [s for s in args.splits.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        bench(Path(args.keep) if args.keep else Path(tmp), args.minutes, splits)


if __name__ == "__main__":
    main()
