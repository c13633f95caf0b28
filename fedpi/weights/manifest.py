"""The tensor manifest (name, dtype, shape, byte length per tensor, in order) and the checks on tensors it describes."""

from __future__ import annotations

import cmath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedpi.weights.errors import (
    MalformedStream,
    ManifestMismatch,
    NonFiniteWeights,
    UnsupportedDtype,
)
from generated.fedpi.v1 import worker_pb2 as pb

# Every dtype a state_dict can hold and that has a fixed byte layout (quantized tensors are not supported).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex128",
        "complex64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    if hasattr(torch, name)
}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        return self.nbytes // self.itemsize

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=self.dtype, shape=list(self.shape), byte_length=self.nbytes)


def supported_dtypes() -> list[str]:
    return list(_DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise UnsupportedDtype(f"dtype {name} cannot be sent; supported: {', '.join(_DTYPES)}")
    return name


def manifest_of(state_dict: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    return [
        TensorMeta(name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        for name, t in state_dict.items()
    ]


def meta_from_proto(spec: pb.TensorSpec) -> TensorMeta:
    if spec.dtype not in _DTYPES:
        raise UnsupportedDtype(f"tensor {spec.name!r} has dtype {spec.dtype!r}; supported: {', '.join(_DTYPES)}")
    shape = tuple(spec.shape)
    if any(d < 0 for d in shape):
        raise MalformedStream(f"tensor {spec.name!r} has a negative dimension in shape {list(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    meta = TensorMeta(spec.name, spec.dtype, shape, spec.byte_length)
    if spec.byte_length != numel * meta.itemsize:
        raise MalformedStream(
            f"tensor {spec.name!r}: byte_length {spec.byte_length} does not match shape {list(shape)} "
            f"of {spec.dtype} ({numel * meta.itemsize} bytes)"
        )
    return meta


def check_manifest(got: Sequence[TensorMeta], expected: Sequence[TensorMeta]) -> None:
    got_names = [m.name for m in got]
    want_names = [m.name for m in expected]
    if got_names != want_names:
        missing = sorted(set(want_names) - set(got_names))
        extra = sorted(set(got_names) - set(want_names))
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same tensors in another order"
        raise ManifestMismatch(f"tensor names differ from the model's: {detail}")
    for g, w in zip(got, expected):
        if g.dtype != w.dtype or g.shape != w.shape:
            raise ManifestMismatch(f"{g.name}: expected {w.dtype}{list(w.shape)}, got {g.dtype}{list(g.shape)}")


def tensors_from_buffer(manifest: Sequence[TensorMeta], buf: bytearray) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for m in manifest:
        if m.nbytes == 0:
            state[m.name] = torch.empty(m.shape, dtype=m.torch_dtype)
        else:
            flat = torch.frombuffer(buf, dtype=m.torch_dtype, count=m.numel, offset=offset)
            state[m.name] = flat.reshape(m.shape)
        offset += m.nbytes
    return state


def all_finite(t: torch.Tensor) -> bool:
    """True unless a floating-point or complex tensor holds NaN or Inf (integers always are finite)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8 kinds have no isfinite kernel of their own
        t = t.float()
    # A finite sum proves every element finite (NaN or Inf in a sum stays NaN or Inf), and summing is over ten times
    # faster than isfinite. Only a sum that overflows needs the element-wise check.
    if cmath.isfinite(t.sum().item()):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if not all_finite(t):
            raise NonFiniteWeights(f"{name} holds NaN or Inf values; the update was rejected")
