"""What differential privacy costs in accuracy (`make bench-privacy`).

Three local workers train the reference CNN on the real MNIST digits of ../shared/data/mnist (8,000 / 2,000, IID)
for 20 rounds of one epoch each, with the defaults, and with DP-SGD on every worker at the noise multiplier that
makes each worker's epsilon about 1, 3 and 8 after the 20 rounds (delta 1e-5; Opacus's get_noise_multiplier, the
worker's shard and batch giving the sampling rate). Prints the final test accuracy and the epsilon the workers
reported, beside the non-private run.

    python -m bench.privacy [--epsilons 1,3,8] [--rounds 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.learning import DATASETS, _demo

ROUNDS = 20
BATCH, SHARD = 64, 8000 // 3  # each of the 3 workers' 2,666 or 2,667 training digits
CLIP = 1.0


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", default="1,3,8", help="comma-separated targets")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--keep", help="keep every run's output here")
    args = p.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        bench(Path(args.keep) if args.keep else Path(tmp), epsilons, args.rounds)


if __name__ == "__main__":
    main()
