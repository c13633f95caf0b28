"""python -m tests.poison_worker --attack KIND[:FACTOR] WORKER_FLAGS...

A real worker (the same process, servicer and protocol) that trains honestly, then poisons what it sends back: the
compromised Pi of the threat model, for the robust-aggregation tests and benchmarks. Attacks:
  scaled:F     the update (trained - received) multiplied by F (a boosted, "model replacement" update)
  sign-flip:F  the update multiplied by -F
  random:F     the update replaced by Gaussian noise, F times the honest update's mean magnitude per coordinate
  huge         every weight set to 1e36 (finite, but overflows a float32 sum)
  inflate      an honest update that claims 9.2e18 training samples
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from worker_service import __main__ as worker_main
from worker_service.trainer import Trainer

ATTACKS = ("scaled", "sign-flip", "random", "huge", "inflate")


def _poison(state: dict[str, torch.Tensor], before: dict[str, torch.Tensor], attack: str, factor: float) -> None:
    with torch.no_grad():
        for name, v in state.items():
            if not v.is_floating_point():
                continue
            delta = v - before[name]
            if attack == "scaled":
                v.copy_(before[name] + factor * delta)
            elif attack == "sign-flip":
                v.copy_(before[name] - factor * delta)
            elif attack == "random":
                v.copy_(before[name] + torch.randn_like(v) * factor * delta.abs().mean())
            elif attack == "huge":
                v.fill_(1e36)


def install(attack: str, factor: float) -> None:
    honest = Trainer.train

    def train(self, cfg, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        outcome = honest(self, cfg, *args, **kwargs)
        _poison(self.model.state_dict(), before, attack, factor)
        if attack == "inflate":
            outcome = dataclasses.replace(outcome, samples=9_200_000_000_000_000_000)
        return outcome

    Trainer.train = train


def main(argv: list[str]) -> int:
    if "--attack" not in argv:
        sys.exit(__doc__)
    at = argv.index("--attack")
    kind, _, factor = argv[at + 1].partition(":")
    if kind not in ATTACKS:
        sys.exit(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}")
    install(kind, float(factor or 10))
    return worker_main.main(argv[:at] + argv[at + 2 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
