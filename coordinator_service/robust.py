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
from dataclasses import dataclass

import torch

from coordinator_service.aggregate import Segmenter, UpdateCheck, accumulator_dtype
from fedpi.serde import MalformedStream, TensorMeta

AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "clipped")


@dataclass(frozen=True)
class Aggregation:
    """An aggregation rule and its parameter: `trim` for trimmed-mean, `clip_norm` for clipped (None: default)."""

    rule: str = "fedavg"
    trim: int | None = None
    clip_norm: float | None = None

    @property
    def coordinate_wise(self) -> bool:
        """Whether the rule needs every worker's stream at once (else updates are folded as they arrive)."""
        return self.rule in ("median", "trimmed-mean")

    def trim_for(self, workers: int) -> int:
        """How many values trimmed-mean drops at each end, for this many workers (default: a fifth, at least 1)."""
        return self.trim if self.trim is not None else max(1, workers // 5)

    def minimum_workers(self) -> int:
        return 2 * self.trim + 1 if self.rule == "trimmed-mean" and self.trim is not None else 1

    def __str__(self) -> str:
        param = self.trim if self.rule == "trimmed-mean" else self.clip_norm
        return self.rule if param is None else f"{self.rule}:{param}"


def parse_aggregation(spec: str) -> Aggregation:
    """'fedavg' | 'median' | 'trimmed-mean[:k]' | 'clipped[:norm]'."""
    rule, _, param = spec.strip().partition(":")
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {spec!r}; choose from fedavg, median, trimmed-mean[:k], clipped[:norm]")
    if not param:
        return Aggregation(rule)
    if rule in ("fedavg", "median"):
        raise ValueError(f"aggregation {spec!r}: {rule} takes no parameter")
    try:
        value = int(param) if rule == "trimmed-mean" else float(param)
    except ValueError:
        value = -1
    if rule == "trimmed-mean" and value >= 0:
        return Aggregation(rule, trim=value)
    if rule == "clipped" and value > 0:
        return Aggregation(rule, clip_norm=value)
    raise ValueError(f"aggregation {spec!r}: trimmed-mean takes a whole number k >= 0 (values dropped at each end), "
                     f"clipped a positive L2 norm")


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
            raise ValueError(f"trimmed-mean drops {trim} value(s) at each end and needs more than {2 * trim} "
                             f"updates, got {n}")
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
