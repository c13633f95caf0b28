"""Sample-level differential privacy on a worker: DP-SGD (Abadi et al., "Deep Learning with Differential Privacy",
CCS 2016) through Opacus, and the worker's own accountant.

For one round, the model's layers compute per-sample gradients (Opacus's GradSampleModule); each is clipped to
`max_grad_norm` (L2), summed, and Gaussian noise of `noise_multiplier x max_grad_norm` is added before the step is
divided by the batch size (Opacus's DPOptimizer). The hooks are removed when the round ends, so a later round without
DP trains as plain torch. Every step is accounted on this worker for the run it belongs to (Opacus's Renyi-DP
accountant; the batches of a round counted as sampled at batch size / shard size, the usual approximation of a
shuffled epoch), and the epsilon this worker's data has spent in the run is reported with the round's result."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Opacus's per-sample hooks make torch say this on every backward of a first layer, whose input needs no gradient:
# expected, and said in every worker's log once a batch otherwise.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
MAX_RUNS = 16  # accountants kept for this many runs (a worker serves one run at a time; older ones are forgotten)


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ValueError(
            "this worker cannot train with DP-SGD: Opacus is not installed (pip install 'fedpi[privacy]')"
        ) from None
    return opacus


@contextlib.contextmanager
def private_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float, batch_size: int
) -> Iterator[torch.optim.Optimizer]:
    """An optimizer whose steps are DP-SGD's, for the length of the block."""
    opacus = _opacus()
    try:
        wrapped = opacus.GradSampleModule(model)
    except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm, whose per-sample gradients do not exist
        raise ValueError(f"DP-SGD cannot train this task's model: {exc}") from None
    try:
        yield opacus.optimizers.DPOptimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=batch_size
        )
    finally:
        wrapped._close()  # the hooks and per-sample gradients go; the model is plain again


class Ledger:
    """The privacy this worker's data has spent, per run."""

    def __init__(self) -> None:
        self._runs: dict[str, Any] = {}

    def spend(self, run: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Account `steps` more steps of `run` and return its epsilon at `delta` so far."""
        accountant = self._runs.pop(run, None) or _opacus().accountants.RDPAccountant()
        self._runs[run] = accountant  # the newest last
        while len(self._runs) > MAX_RUNS:
            del self._runs[next(iter(self._runs))]
        if steps:
            accountant.history.append((noise_multiplier, sample_rate, steps))
        return float(accountant.get_epsilon(delta))
