"""Coordinate-wise reduction of several updates walked in step, chunk by chunk: every worker cuts its payload into
the same chunks, so the coordinator holds one chunk per worker and the result, memory O(model + workers x chunk),
whatever the reduction (a rule's: median, trimmed mean; see coordinator_service.policy.rules). Pure torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coordinator_service.engine.aggregate import Segmenter, UpdateCheck, accumulator_dtype
from coordinator_service.policy.rules import Reduce
from fedpi.weights.serde import MalformedStream, TensorMeta


class StepFailed(Exception):
    """One worker's piece broke the step: `position` says whose, `cause` why."""

    def __init__(self, position: int, cause: BaseException):
        super().__init__(str(cause))
        self.position = position
        self.cause = cause


class CoordinateReducer:
    """`reduce` across N updates fed in aligned pieces: piece k of every worker covers the same bytes."""

    def __init__(self, manifest: Sequence[TensorMeta], checks: Sequence[UpdateCheck], reduce: Reduce):
        self.manifest = list(manifest)
        self.reduce = reduce
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
            acc[start : start + len(x0)] = self.reduce(stack)

    def finish(self) -> None:
        for position, segmenter in enumerate(self._segmenters):
            try:
                segmenter.finish()
            except MalformedStream as exc:
                raise StepFailed(position, exc) from exc
