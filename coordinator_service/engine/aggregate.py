"""Streaming FedAvg: each arriving chunk is folded into one running weighted sum.

The coordinator therefore holds the global model, one accumulator and a few chunks in flight, whatever the number
of workers: never every worker's full model at once. Every piece of an update is also measured against the global
model it was trained from, and an update that strays too far is refused before the piece enters the sum, so a
worker sending finite but huge values cannot overflow it. Pure torch; no I/O, no gRPC.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from fedpi.weights.serde import MalformedStream, NonFiniteWeights, TensorMeta, WeightsError, all_finite


class UpdateOutOfRange(WeightsError):
    """An update lies further from the global model it was trained from than the configured bound allows."""


class NonFiniteAggregate(Exception):
    """The aggregate of a round holds NaN or Inf; the global model was left as it was."""


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums are kept in double precision: a float32 value times a sample count is exact there, so the aggregate
    rounds to the same float32 model whatever order the workers' updates arrive in, and a run is repeatable (a
    resumed run ends where an uninterrupted one does). Integers and bools are averaged, then rounded back."""
    return torch.complex128 if dtype.is_complex else torch.float64


def is_float(meta: TensorMeta) -> bool:
    return meta.torch_dtype.is_floating_point or meta.torch_dtype.is_complex


def fits(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `values` (an accumulator) are finite and stay finite as `dtype`: float32 tops out at 3.4e38. A real
    range is checked as it is, without a converted model-sized copy."""
    if not all_finite(values):
        return False
    if values.dtype == dtype:
        return True
    if values.is_complex() or not values.numel():
        return all_finite(values.to(dtype))
    low, high = torch.aminmax(values)
    return -torch.finfo(dtype).max <= float(low) and float(high) <= torch.finfo(dtype).max


def flat_reference(state: Mapping[str, torch.Tensor], manifest: Sequence[TensorMeta]) -> list[torch.Tensor]:
    """The global model's tensors as flat views (no copy), in manifest order."""
    return [state[m.name].detach().reshape(-1) for m in manifest]


def model_norm(reference: Sequence[torch.Tensor], manifest: Sequence[TensorMeta]) -> float:
    """L2 norm over the floating-point tensors (integer buffers such as BatchNorm counters are not weights)."""
    # vector_norm reduces without a squared copy of the tensor: the largest tensor may be most of the model.
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t, m in zip(reference, manifest) if is_float(m)))


def distance(flat: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], manifest: Sequence[TensorMeta]) -> float:
    """L2 distance between two flat models over their floating-point tensors, as UpdateCheck measures an update."""
    return math.sqrt(
        sum(
            float(torch.linalg.vector_norm(a - r.to(a.dtype))) ** 2
            for a, r, m in zip(flat, reference, manifest)
            if is_float(m)
        )
    )


class Segmenter:
    """Cuts a payload, given as raw byte pieces in order, into runs of whole elements of one tensor each.

    Pieces may split tensors and even single elements: a partial element waits for the rest of its bytes. Payloads
    cut into the same pieces (same chunk size) give the same runs, which is what lets robust rules walk several
    workers' streams in step."""

    def __init__(self, manifest: Sequence[TensorMeta]):
        self.manifest = list(manifest)
        self._tensor = 0  # index into the manifest
        self._in_tensor = 0  # bytes of the current tensor already cut
        self._carry = bytearray()

    def add(self, raw: bytes) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (tensor index, first element, elements) for every whole run `raw` completes."""
        # The runs yielded are views of `data`: the piece itself unless a partial element waits from the last one.
        data = self._carry + raw if self._carry else raw
        used = 0
        while self._tensor < len(self.manifest):
            meta = self.manifest[self._tensor]
            if self._in_tensor == meta.nbytes:
                self._tensor, self._in_tensor = self._tensor + 1, 0
                continue
            take = min(meta.nbytes - self._in_tensor, len(data) - used)
            take -= take % meta.itemsize
            if take == 0:
                break
            x = torch.frombuffer(data, dtype=meta.torch_dtype, count=take // meta.itemsize, offset=used)
            yield self._tensor, self._in_tensor // meta.itemsize, x
            used += take
            self._in_tensor += take
        self._carry = bytearray(data[used:]) if used < len(data) else bytearray()
        if self._tensor == len(self.manifest) and self._carry:
            raise MalformedStream("payload longer than its manifest")

    def finish(self) -> None:
        # Skip trailing empty tensors, then the payload must be exactly complete.
        while self._tensor < len(self.manifest) and self._in_tensor == self.manifest[self._tensor].nbytes:
            self._tensor, self._in_tensor = self._tensor + 1, 0
        if self._tensor != len(self.manifest) or self._carry:
            raise MalformedStream("payload ended before its manifest was complete")


class UpdateCheck:
    """Checks the runs of one update as they arrive: finite, and within `max_distance` (L2, floating-point
    tensors) of the global model it was trained from. Raises before an offending run is used."""

    def __init__(
        self,
        manifest: Sequence[TensorMeta],
        reference: Sequence[torch.Tensor] | None = None,
        max_distance: float = math.inf,
    ):
        self.manifest = manifest
        self.reference = reference
        self.max_distance = max_distance
        self.squared = 0.0  # squared distance of the runs seen so far

    @property
    def distance(self) -> float:
        return math.sqrt(self.squared)

    def check(self, index: int, start: int, x: torch.Tensor) -> None:
        meta = self.manifest[index]
        if self.reference is None or not is_float(meta):
            if not all_finite(x):
                raise NonFiniteWeights(f"{meta.name} holds NaN or Inf values; the update was rejected")
            return
        ref = self.reference[index][start : start + len(x)]
        # In the update's own precision (float32 at least): a distance that overflows is inf, and refused all the same.
        work = (
            x.dtype if x.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else torch.float32
        )
        squared = float(torch.linalg.vector_norm(x.to(work) - ref.to(work))) ** 2
        if not math.isfinite(squared):
            # The global model is finite, so NaN or Inf here is either in the update or an overflowing distance.
            if not all_finite(x):
                raise NonFiniteWeights(f"{meta.name} holds NaN or Inf values; the update was rejected")
            squared = math.inf
        self.squared += squared
        if self.squared > self.max_distance**2:
            raise UpdateOutOfRange(
                f"the update lies more than {self.max_distance:.4g} (L2) from the global model it was trained from "
                f"(reached in {meta.name}); refused before it entered the aggregate (see --max-update-ratio)"
            )


class WeightedSum:
    """Running sum of weight * tensor over any number of state_dicts sharing one manifest."""

    def __init__(self, manifest: Sequence[TensorMeta], reuse: Sequence[torch.Tensor] | None = None):
        """`reuse`: the accumulators of an earlier sum that is done with (e.g. last round's), zeroed and used again
        rather than allocated: a fresh model-sized buffer costs a page fault per 4 KiB."""
        self.manifest = list(manifest)
        dtypes = [accumulator_dtype(m.torch_dtype) for m in self.manifest]
        if reuse is not None and [(len(a), a.dtype) for a in reuse] == [(m.numel, d) for m, d in zip(manifest, dtypes)]:
            self._acc = [a.zero_() for a in reuse]
        else:
            self._acc = [torch.zeros(m.numel, dtype=d) for m, d in zip(self.manifest, dtypes)]
        self.total_weight = 0.0
        self.contributors = 0

    def stream(self, weight: float, check: UpdateCheck | None = None) -> StreamFold:
        """Start folding one worker's payload, given in raw byte pieces in order."""
        if not weight > 0:
            raise ValueError(f"FedAvg weight must be positive, got {weight}")
        return StreamFold(self, weight, check or UpdateCheck(self.manifest))

    def add_state_dict(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold a whole state_dict (same manifest) at once."""
        fold = self.stream(weight)
        for m in self.manifest:
            t = state[m.name].detach().contiguous().reshape(-1)
            fold.add(t.view(torch.uint8).numpy().tobytes() if m.nbytes else b"")
        fold.finish()

    def add_run(self, index: int, start: int, x: torch.Tensor, weight: float) -> None:
        acc = self._acc[index]
        acc[start : start + len(x)].add_(x, alpha=weight)  # cast element by element: no double-precision copy of x

    @property
    def accumulators(self) -> list[torch.Tensor]:
        return self._acc

    def mean(self) -> list[torch.Tensor]:
        """The weighted mean, flat, in the accumulator's dtype. Divides the accumulator in place, so no second
        model-sized buffer appears; the sum is spent afterwards. Raises NonFiniteAggregate if any of it is NaN/Inf."""
        if self.contributors == 0:
            raise ValueError("no contributions to average")
        for m, acc in zip(self.manifest, self._acc):
            acc.div_(self.total_weight)
            if not all_finite(acc):
                raise NonFiniteAggregate(f"the aggregate of {m.name} holds NaN or Inf; the global model is unchanged")
        return self._acc

    def mean_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write the weighted mean into `state`'s tensors in place; `state` is left as it was if the mean is not
        finite (NonFiniteAggregate)."""
        install(self.manifest, self.mean(), state)


def install(manifest: Sequence[TensorMeta], flat: Sequence[torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy flat accumulator-dtype tensors into `state`, rounding integer and bool tensors back."""
    for m, values in zip(manifest, flat):
        if m.torch_dtype == torch.bool:
            values = values >= 0.5
        elif not is_float(m):
            values = values.round()
        with torch.no_grad():
            state[m.name].copy_(values.reshape(m.shape))  # converts as it copies


class StreamFold:
    """Folds one payload into a WeightedSum piece by piece, checking every run before it enters the sum."""

    def __init__(self, total: WeightedSum, weight: float, check: UpdateCheck):
        self._total = total
        self._weight = weight
        self._segmenter = Segmenter(total.manifest)
        self.check = check
        self.failed = False  # a piece was refused: nothing after it is folded (pieces may be queued already)

    def add(self, raw: bytes) -> None:
        if self.failed:
            return
        try:
            for index, start, x in self._segmenter.add(raw):
                self.check.check(index, start, x)
                self._fold_run(index, start, x)
        except Exception:
            self.failed = True
            raise

    def _fold_run(self, index: int, start: int, x: torch.Tensor) -> None:
        self._total.add_run(index, start, x, self._weight)

    def finish(self) -> None:
        self._segmenter.finish()
        self._total.total_weight += self._weight
        self._total.contributors += 1


class DeltaFold(StreamFold):
    """Adds weight * (update - global model) of one payload's floating-point tensors to a WeightedSum, without
    counting a contributor: the correction that turns a folded update into its clipped version."""

    def __init__(self, total: WeightedSum, weight: float, check: UpdateCheck, reference: Sequence[torch.Tensor]):
        super().__init__(total, weight, check)
        self._reference = reference

    def _fold_run(self, index: int, start: int, x: torch.Tensor) -> None:
        if is_float(self._total.manifest[index]):
            ref = self._reference[index][start : start + len(x)]
            self._total.add_run(index, start, x.double() - ref.double(), self._weight)

    def finish(self) -> None:
        self._segmenter.finish()
