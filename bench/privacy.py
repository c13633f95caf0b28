"""What differential privacy costs in accuracy (`make bench-privacy`).

Three local workers train the reference CNN on the real MNIST digits of ../shared/data/mnist (8,000 / 2,000, IID)
for 20 rounds of one epoch each, with the defaults, and with DP-SGD on every worker at the noise multiplier that
makes each worker's epsilon about 1, 3 and 8 after the 20 rounds (delta 1e-5; Opacus's get_noise_multiplier, the
worker's shard and batch giving the sampling rate). Prints the final test accuracy and the epsilon the workers
reported, beside the non-private run.

Then worker-level DP across a fleet (`--dp-noise-multiplier`): 10 local workers of 800 digits each, 5 sampled a
round, updates clipped to the median update norm of the same fleet without privacy (the usual choice of a fixed
clip), at the noise multiplier that makes the accountant's epsilon about 1, 3 and 8
after the 20 rounds (sample rate 0.5), beside the same fleet without privacy.

    python -m bench.privacy [--epsilons 1,3,8] [--rounds 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.learning import DATASETS, _demo, _metrics

ROUNDS = 20
BATCH, SHARD = 64, 8000 // 3  # each of the 3 workers' 2,666 or 2,667 training digits
CLIP = 1.0
FLEET, PER_ROUND = 10, 5


def noise_for(epsilon: float, rounds: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    steps = rounds * -(-SHARD // BATCH)  # one epoch a round
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=1e-5, sample_rate=BATCH / SHARD,
                                      steps=steps, accountant="rdp"))  # fmt: skip


def bench(out: Path, epsilons: list[float], rounds: int) -> None:
    data = DATASETS["mnist-10k"]
    if not data.available:
        print(f"privacy  skipped: {data.missing}")
        return
    print(f"\nDP-SGD on every worker: MNIST 8,000 / 2,000 iid, 3 workers, {rounds} rounds of one epoch, "
          f"clip {CLIP:g}, delta 1e-5\n")  # fmt: skip
    print("| run | noise multiplier | epsilon reported (largest worker) | final test accuracy |")
    print("|---|---|---|---|")
    runs = [("non-private", None)] + [(f"DP-SGD, epsilon {e:g}", e) for e in epsilons]
    for name, epsilon in runs:
        args = ["--rounds", str(rounds), *data.args]
        sigma = noise_for(epsilon, rounds) if epsilon else None
        if sigma is not None:
            args += ["--dp-sgd-noise-multiplier", f"{sigma:.6f}", "--dp-sgd-max-grad-norm", str(CLIP)]
        metrics = _demo(out / name.replace(" ", "_").replace(",", ""), *args)
        spent = metrics[-1].get("dp_sgd_epsilon")
        print(
            f"| {name} | {f'{sigma:.3f}' if sigma else '-'} | {f'{spent:.2f}' if spent else '-'} | "
            f"{metrics[-1]['test_accuracy']:.2%} |",
            flush=True,
        )


def fleet_noise_for(epsilon: float, rounds: int) -> float:
    """The worker-level noise multiplier whose epsilon after `rounds` is `epsilon` (bisection on the accountant)."""
    from coordinator_service.policy.privacy import Accountant

    low, high = 0.3, 50.0
    for _ in range(50):
        mid = (low + high) / 2
        if Accountant(mid, PER_ROUND / FLEET, 1e-5).epsilon(rounds) > epsilon:
            low = mid
        else:
            high = mid
    return high


def bench_fleet(out: Path, epsilons: list[float], rounds: int) -> None:
    data = DATASETS["mnist-10k"]
    if not data.available:
        print(f"privacy  skipped: {data.missing}")
        return
    print(f"\nworker-level DP: MNIST 8,000 / 2,000 iid, {FLEET} workers, {PER_ROUND} sampled a round, {rounds} rounds "
          f"of one epoch, delta 1e-5\n")  # fmt: skip
    print("| run | noise multiplier | clip | noise per weight | epsilon reported | final test accuracy |")
    print("|---|---|---|---|---|---|")
    fleet = ["--local-workers", str(FLEET), "--workers-per-round", str(PER_ROUND), "--min-workers", "1"]
    clip = 0.0
    for name, epsilon in [("non-private", None)] + [(f"worker-level DP, epsilon {e:g}", e) for e in epsilons]:
        args = ["--rounds", str(rounds), *data.args, *fleet]
        sigma = fleet_noise_for(epsilon, rounds) if epsilon else None
        if sigma is not None:
            args += ["--dp-noise-multiplier", f"{sigma:.6f}", "--dp-clip-norm", f"{clip:.6f}"]
        run_dir = out / ("fleet_" + name.replace(" ", "_").replace(",", ""))
        try:
            metrics = _demo(run_dir, *args)
            outcome = f"{metrics[-1]['test_accuracy']:.2%}"
        except SystemExit as failed:  # noise that wrecks the model ends the run: say where, keep the table going
            metrics = _metrics(run_dir)
            reason = str(failed).split("training_failed")[0][-160:] if "NaN" not in str(failed) else "NaN updates"
            outcome = f"run failed in round {len(metrics) + 1} ({reason}); {metrics[-1]['test_accuracy']:.2%} before"
        if sigma is None:
            clip = statistics.median(w["update_distance"] for m in metrics for w in m["workers"].values())
        spent = metrics[-1].get("dp_epsilon")
        print(
            f"| {name} | {f'{sigma:.3f}' if sigma else '-'} | {clip:.3f} | "
            f"{f'{sigma * clip / PER_ROUND:.4f}' if sigma else '-'} | {f'{spent:.2f}' if spent else '-'} | "
            f"{outcome} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="1,3,8", help="comma-separated targets")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--keep", help="keep every run's output here")
    p.add_argument("--fleet-only", action="store_true", help="only the worker-level DP fleet")
    args = p.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    p_fleet = args.fleet_only
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        if not p_fleet:
            bench(out, epsilons, args.rounds)
        bench_fleet(out, epsilons, args.rounds)


if __name__ == "__main__":
    main()
