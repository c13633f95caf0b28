"""Streaming FedAvg: each arriving chunk is folded into one running weighted sum.

The coordinator therefore holds the global model, one accumulator and a few chunks in flight, whatever the number
of workers: never every worker's full model at once. Pure torch; no I/O, no gRPC.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedpi.serde import MalformedStream, NonFiniteWeights, TensorMeta, all_finite


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16) or str(dtype).startswith("torch.float8"):
        return torch.float32
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.float64  # integers and bools: averaged, then rounded back


class WeightedSum:
    """Running sum of weight * tensor over any number of state_dicts sharing one manifest."""

    def __init__(self, manifest: Sequence[TensorMeta]):
        self.manifest = list(manifest)
        self._acc = [torch.zeros(m.numel, dtype=_accumulator_dtype(m.torch_dtype)) for m in self.manifest]
        self.total_weight = 0.0
        self.contributors = 0

    def stream(self, weight: float) -> StreamFold:
        """Start folding one worker's payload, given in raw byte pieces in order."""
        if not weight > 0:
            raise ValueError(f"FedAvg weight must be positive, got {weight}")
        return StreamFold(self, weight)

    def add_state_dict(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold a whole state_dict (same manifest) at once."""
        fold = self.stream(weight)
        for m in self.manifest:
            t = state[m.name].detach().contiguous().reshape(-1)
            fold.add(t.view(torch.uint8).numpy().tobytes() if m.nbytes else b"")
        fold.finish()

    def mean_into(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write the weighted mean into `state`'s tensors in place (e.g. the global model's state_dict).

        Divides the accumulator in place, so no second model-sized buffer appears; the sum is spent afterwards.
        """
        if self.contributors == 0:
            raise ValueError("no contributions to average")
        for m, acc in zip(self.manifest, self._acc):
            target = state[m.name]
            mean = acc.div_(self.total_weight)
            if m.torch_dtype == torch.bool:
                mean = mean >= 0.5
            elif not (m.torch_dtype.is_floating_point or m.torch_dtype.is_complex):
                mean = mean.round()
            with torch.no_grad():
                target.copy_(mean.reshape(m.shape).to(m.torch_dtype))


class StreamFold:
    """Folds one payload into a WeightedSum piece by piece; pieces may split tensors and even single elements."""

    def __init__(self, total: WeightedSum, weight: float):
        self._total = total
        self._weight = weight
        self._tensor = 0  # index into the manifest
        self._in_tensor = 0  # bytes of the current tensor already folded
        self._carry = bytearray()  # a partial element waiting for the rest of its bytes

    def add(self, raw: bytes) -> None:
        data = self._carry + raw
        manifest, used = self._total.manifest, 0
        while self._tensor < len(manifest):
            meta = manifest[self._tensor]
            if self._in_tensor == meta.nbytes:
                self._tensor, self._in_tensor = self._tensor + 1, 0
                continue
            take = min(meta.nbytes - self._in_tensor, len(data) - used)
            take -= take % meta.itemsize
            if take == 0:
                break
            x = torch.frombuffer(data, dtype=meta.torch_dtype, count=take // meta.itemsize, offset=used)
            if not all_finite(x):
                raise NonFiniteWeights(f"{meta.name} holds NaN or Inf values; the update was rejected")
            start = self._in_tensor // meta.itemsize
            acc = self._total._acc[self._tensor]
            acc[start : start + len(x)].add_(x.to(acc.dtype), alpha=self._weight)
            used += take
            self._in_tensor += take
        self._carry = data[used:]
        if self._tensor == len(manifest) and self._carry:
            raise MalformedStream("payload longer than its manifest")

    def finish(self) -> None:
        # Skip trailing empty tensors, then the payload must be exactly complete.
        manifest = self._total.manifest
        while self._tensor < len(manifest) and self._in_tensor == manifest[self._tensor].nbytes:
            self._tensor, self._in_tensor = self._tensor + 1, 0
        if self._tensor != len(manifest) or self._carry:
            raise MalformedStream("payload ended before its manifest was complete")
        self._total.total_weight += self._weight
        self._total.contributors += 1
