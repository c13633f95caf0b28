"""Aggregation rules that one bad worker cannot steer, computed as the updates stream in.

- `median`: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018). The mean of the two middle values when the count is even.
- `trimmed-mean[:k]`: per coordinate, drop the k largest and k smallest values and average the rest (same paper).
- `clipped[:norm]`: FedAvg in which each update's distance from the global model is clipped to `norm` (by default
  the median distance of the round), as in Sun et al., "Can You Really Backdoor Federated Learning?", 2019.

Flower's Krum, median and trimmed-mean strategies hold every worker's whole model. Here the coordinate-wise rules
walk all workers' GetWeights streams in step, chunk by chunk (every worker cuts its payload into the same chunks), so
the coordinator holds one chunk per worker and the result: memory O(model + workers x chunk). Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coordinator_service.engine.aggregate import Segmenter, UpdateCheck, accumulator_dtype
from coordinator_service.policy.rules import AGGREGATIONS, Aggregation, parse_aggregation  # noqa: E402,F401 - re-exported
from fedpi.weights.serde import MalformedStream, TensorMeta


def reduce_coordinates(stack: torch.Tensor, trim: int | None) -> torch.Tensor:
    """Median (trim None) or trimmed mean over dim 0 of a (workers, elements) tensor."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    if trim is None:
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return ordered[trim : n - trim].mean(dim=0)


class StepFailed(Exception):
    """One worker's piece broke the step: `position` says whose, `cause` why."""

    def __init__(self, position: int, cause: Exception):
        super().__init__(str(cause))
        self.position = position
        self.cause = cause


class CoordinateReducer:
    """Median or trimmed mean of N updates fed in aligned pieces: piece k of every worker covers the same bytes."""

    def __init__(self, manifest: Sequence[TensorMeta], checks: Sequence[UpdateCheck], trim: int | None):
        n = len(checks)
        if trim is not None and n <= 2 * trim:
            raise ValueError(
                f"trimmed-mean drops {trim} value(s) at each end and needs more than {2 * trim} updates, got {n}"
            )
        self.manifest = list(manifest)
        self.trim = trim
        self.checks = list(checks)
        self.result = [torch.zeros(m.numel, dtype=accumulator_dtype(m.torch_dtype)) for m in self.manifest]
        self._segmenters = [Segmenter(self.manifest) for _ in checks]

    def add_step(self, pieces: Sequence[bytes]) -> None:
        runs = []
        for position, (segmenter, check, piece) in enumerate(zip(self._segmenters, self.checks, pieces)):
            try:
                mine = list(segmenter.add(piece))
                for index, start, x in mine:
                    check.check(index, start, x)
            except Exception as exc:
                raise StepFailed(position, exc) from exc
            runs.append(mine)
        for k, (index, start, x0) in enumerate(runs[0]):
            acc = self.result[index]
            stack = torch.stack([r[k][2].to(acc.dtype) for r in runs])
            acc[start : start + len(x0)] = reduce_coordinates(stack, self.trim)

    def finish(self) -> None:
        for position, segmenter in enumerate(self._segmenters):
            try:
                segmenter.finish()
            except MalformedStream as exc:
                raise StepFailed(position, exc) from exc
