"""Lossy chunk encodings of a weight stream: float16 / bfloat16 transport, and int8 deltas with error feedback.

A lossy chunk holds elements of one tensor only, so every chunk is decoded on its own into the tensor's dtype; the
digest and offsets of a stream always refer to those decoded bytes. Sender and receiver decode with the same
function (`dequantize`), element-wise IEEE operations only, so both sides hash the same bytes on any CPU.

int8 deltas: q = round((update - base + residual) / scale), scale = max |.| / 127 per chunk; the worker keeps
residual = (update - base + residual) - scale * q for its next update (error feedback: Seide et al., "1-bit SGD",
Interspeech 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from generated.fedpi.v1 import worker_pb2 as pb

FP16, BF16, INT8 = pb.CHUNK_ENCODING_FP16, pb.CHUNK_ENCODING_BF16, pb.CHUNK_ENCODING_INT8_DELTA
LOSSY = (FP16, BF16, INT8)
_NARROW: dict[int, torch.dtype] = {FP16: torch.float16, BF16: torch.bfloat16}
_SCALE = struct.Struct("<f")
SCALE_BYTES = _SCALE.size
# Names for --compression, logs and errors.
NAMES: dict[int, str] = {
    pb.CHUNK_ENCODING_RAW: "none",
    pb.CHUNK_ENCODING_ZLIB: "zlib",
    FP16: "fp16",
    BF16: "bf16",
    INT8: "int8",
}


def encoded(dtype: torch.dtype, encoding: int) -> bool:
    """Whether a tensor of `dtype` is narrowed by `encoding` (otherwise it travels raw)."""
    if encoding in _NARROW:
        return dtype in (torch.float32, torch.float64)
    return encoding == INT8 and dtype.is_floating_point


def wire_itemsize(dtype: torch.dtype, encoding: int) -> int:
    if not encoded(dtype, encoding):
        return dtype.itemsize
    return 1 if encoding == INT8 else 2


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + count) of tensor `index`: what one lossy chunk carries."""

    index: int
    start: int
    count: int


def pieces(numels: Sequence[int], dtypes: Sequence[torch.dtype], chunk_size: int, encoding: int) -> Iterator[Piece]:
    """How a payload is cut for a lossy encoding: each tensor in runs of as many elements as fit in `chunk_size`
    bytes on the wire (at least one). The receiver of a stream cut another way finds out from the lengths."""
    for index, (numel, dtype) in enumerate(zip(numels, dtypes)):
        per_chunk = max(1, chunk_size // wire_itemsize(dtype, encoding))
        for start in range(0, numel, per_chunk):
            yield Piece(index, start, min(per_chunk, numel - start))


def dequantize(q: torch.Tensor, scale: float, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + scale * q in `dtype`, as two separately rounded operations (the same bytes on every CPU)."""
    return torch.mul(q.to(dtype), scale).add_(base.to(dtype))


def encode(
    x: torch.Tensor, encoding: int, base: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> tuple[bytes, torch.Tensor]:
    """One piece (flat, one tensor's elements) -> (wire bytes, the values the receiver will decode).

    For int8, `base` is the same piece of the weights the update was trained from and `residual` the error carried
    from earlier updates; the residual is updated in place."""
    if not encoded(x.dtype, encoding):
        return _bytes(x), x
    if encoding in _NARROW:
        narrow = x.to(_NARROW[encoding])
        return _bytes(narrow), narrow.to(x.dtype)
    if base is None:
        raise ValueError("int8 deltas need the weights the update was trained from (base)")
    delta = x.to(torch.float32) - base.to(torch.float32)
    if residual is not None:
        delta.add_(residual)
    scale = _SCALE.unpack(_SCALE.pack(float(delta.abs().max()) / 127))[0]  # rounded to what the wire carries
    if scale == 0:
        q = torch.zeros_like(delta, dtype=torch.int8)
    else:  # a NaN or Inf scale decodes to NaN on the receiver, which refuses it as it would the raw update
        q = torch.round(delta / scale).clamp_(-127, 127).to(torch.int8)
    if residual is not None:
        residual.copy_(delta.sub_(q.to(torch.float32) * scale))
    return _SCALE.pack(scale) + _bytes(q), dequantize(q, scale, base, x.dtype)


def decode(data: bytes | memoryview, dtype: torch.dtype, encoding: int, base: torch.Tensor | None) -> torch.Tensor:
    """Wire bytes of one piece -> its values in `dtype`. ValueError for lengths that cannot be such a piece."""
    if not encoded(dtype, encoding):
        return _frombuffer(data, dtype)
    if encoding in _NARROW:
        return _frombuffer(data, _NARROW[encoding]).to(dtype)
    if len(data) <= _SCALE.size:
        raise ValueError(
            f"an int8 chunk holds a {_SCALE.size}-byte scale and at least one value, got {len(data)} bytes"
        )
    (scale,) = _SCALE.unpack_from(data)
    q = _frombuffer(memoryview(data)[_SCALE.size :], torch.int8)
    if base is None or len(base) != len(q):
        raise ValueError(f"int8 chunk of {len(q)} values does not fit the tensor it continues")
    return dequantize(q, scale, base, dtype)


def _frombuffer(data, dtype: torch.dtype) -> torch.Tensor:
    if len(data) % dtype.itemsize:
        raise ValueError(f"{len(data)} bytes are not whole {dtype} elements")
    if not len(data):
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype)


def _bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def raw_view(x: torch.Tensor) -> memoryview:
    """The bytes of a flat tensor, without a copy."""
    return x.contiguous().view(torch.uint8).numpy().data.cast("B")
