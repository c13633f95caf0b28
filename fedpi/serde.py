"""Tensors <-> chunked weight streams: a header with the tensor manifest and a digest, then raw bytes in chunks.

Never pickle: the payload is the little-endian bytes of each tensor, in manifest order, so any fedpi release can
read any other's weights and a bad stream is caught by plain checks, not by a deserialiser crash. Both services use
this module: the worker to install and send weights, the coordinator to send and to fold weights into FedAvg.
"""

from __future__ import annotations

import cmath
import hashlib
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from generated.fedpi.v1 import worker_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
DIGEST_PREFIX = "sha256:"
SUPPORTED_ENCODINGS = (pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB)

# Every dtype a state_dict can hold and that has a fixed byte layout (quantized tensors are not supported).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "complex128", "complex64",
        "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}


class WeightsError(Exception):
    """A weight stream or state_dict that cannot be accepted. `status` names the gRPC status code that fits."""

    status = "INVALID_ARGUMENT"


class MalformedStream(WeightsError):
    """The stream breaks the protocol: missing or repeated header, chunk out of order, bad sizes."""


class ManifestMismatch(WeightsError):
    """The tensors announced do not match the model they are meant for (names, dtypes or shapes)."""


class ArchitectureMismatch(WeightsError):
    """The weights belong to another model architecture."""

    status = "FAILED_PRECONDITION"


class DigestMismatch(WeightsError):
    """The bytes received do not hash to the digest announced: corrupted in transit."""

    status = "DATA_LOSS"


class PayloadTooLarge(WeightsError):
    """A chunk or the whole payload is larger than this side accepts."""

    status = "RESOURCE_EXHAUSTED"


class NonFiniteWeights(WeightsError):
    """A floating-point tensor holds NaN or Inf."""


class UploadTimedOut(WeightsError):
    """A weight upload did not arrive within the time its size allows."""

    status = "DEADLINE_EXCEEDED"


class UnsupportedDtype(WeightsError):
    """A tensor dtype that has no portable byte layout here."""


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


def _meta_from_proto(spec: pb.TensorSpec) -> TensorMeta:
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


def _byte_view(t: torch.Tensor) -> memoryview:
    # reshape(-1) first: a 0-d tensor cannot be reinterpreted as bytes directly.
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def digest_of(views: Sequence[memoryview]) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return DIGEST_PREFIX + h.hexdigest()


class WeightsPayload:
    """A state_dict prepared once for sending: manifest, digest and byte views, no copy of the tensors.

    The same payload can be streamed to any number of receivers; each call to `chunks` copies one chunk at a time.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], *, round: int, architecture: str,
                 round_id: str = "", trained: bool = False):
        self.round = round
        self.round_id = round_id
        self.trained = trained
        self.architecture = architecture
        self.manifest = manifest_of(state_dict)
        self._views = [_byte_view(t) for t in state_dict.values()]
        self.total_bytes = sum(m.nbytes for m in self.manifest)
        self.digest = digest_of(self._views)

    def header(self, encoding: int = pb.CHUNK_ENCODING_RAW) -> pb.WeightsHeader:
        return pb.WeightsHeader(
            round=self.round,
            model_architecture=self.architecture,
            tensors=[m.to_proto() for m in self.manifest],
            total_bytes=self.total_bytes,
            digest=self.digest,
            encoding=encoding,
            round_id=self.round_id,
            trained=self.trained,
        )

    def chunks(
        self, chunk_size: int = DEFAULT_CHUNK_BYTES, encoding: int = pb.CHUNK_ENCODING_RAW
    ) -> Iterator[pb.WeightsChunk]:
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        yield pb.WeightsChunk(header=self.header(encoding))
        offset = 0
        for pieces in _cut(self._views, chunk_size):
            # One copy per chunk: a piece within one tensor is copied straight from it, several are joined.
            raw = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
            yield _data_chunk(offset, raw, encoding)
            offset += len(raw)


def _cut(views: Sequence[memoryview], chunk_size: int) -> Iterator[list[memoryview]]:
    """The payload's bytes as chunks of `chunk_size` (the last one shorter), each a list of slices of the views."""
    pieces: list[memoryview] = []
    room = chunk_size
    for view in views:
        pos = 0
        while pos < len(view):
            take = min(room, len(view) - pos)
            pieces.append(view[pos : pos + take])
            pos += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], chunk_size
    if pieces:
        yield pieces


def _data_chunk(offset: int, raw: bytes, encoding: int) -> pb.WeightsChunk:
    data = zlib.compress(raw, 1) if encoding == pb.CHUNK_ENCODING_ZLIB else raw
    return pb.WeightsChunk(data=pb.WeightsData(offset=offset, data=data))


class StreamReader:
    """Checks a weight stream message by message; yields validated raw byte segments to its caller.

    `expected` is the manifest the receiver's model has; the header must match it exactly. Nothing is trusted
    until `finish` has checked length and digest, so callers must treat earlier segments as provisional.
    """

    def __init__(
        self,
        *,
        architecture: str,
        expected: Sequence[TensorMeta] | None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ):
        self.architecture = architecture
        self.expected = list(expected) if expected is not None else None
        self.max_chunk_bytes = max_chunk_bytes
        self.max_payload_bytes = max_payload_bytes
        self.header: pb.WeightsHeader | None = None
        self.manifest: list[TensorMeta] = []
        self.received = 0
        self._hash = hashlib.sha256()

    def accept(self, chunk: pb.WeightsChunk) -> bytes | None:
        """Validate one message; return the raw bytes of a data chunk (None for the header)."""
        kind = chunk.WhichOneof("kind")
        if kind == "header":
            self._accept_header(chunk.header)
            return None
        if kind != "data":
            raise MalformedStream("empty WeightsChunk: set either header or data")
        if self.header is None:
            raise MalformedStream("data chunk before the header: a weight stream must start with a WeightsHeader")
        return self._accept_data(chunk.data)

    def _accept_header(self, header: pb.WeightsHeader) -> None:
        if self.header is not None:
            raise MalformedStream("second header in one weight stream")
        if header.model_architecture != self.architecture:
            raise ArchitectureMismatch(
                f"weights are for model {header.model_architecture!r} but this side runs {self.architecture!r}; "
                f"start the worker with --model {header.model_architecture} or the coordinator with "
                f"--model {self.architecture}"
            )
        if header.encoding not in (pb.CHUNK_ENCODING_UNSPECIFIED, *SUPPORTED_ENCODINGS):
            raise MalformedStream(f"unknown chunk encoding {header.encoding}")
        if not header.digest.startswith(DIGEST_PREFIX):
            raise MalformedStream(f"digest must be '{DIGEST_PREFIX}<hex>', got {header.digest[:80]!r}")
        manifest = [_meta_from_proto(s) for s in header.tensors]
        total = sum(m.nbytes for m in manifest)
        if header.total_bytes != total:
            raise MalformedStream(f"header says total_bytes={header.total_bytes} but its tensors add up to {total}")
        if total > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {total} bytes exceeds the limit of {self.max_payload_bytes} bytes; "
                f"raise --max-payload-mb on the receiving side if this model is intended"
            )
        if self.expected is not None:
            _check_manifest(manifest, self.expected)
        self.header = header
        self.manifest = manifest

    def _accept_data(self, data: pb.WeightsData) -> bytes:
        assert self.header is not None
        if len(data.data) > self.max_chunk_bytes:
            raise PayloadTooLarge(f"chunk of {len(data.data)} bytes exceeds the limit of {self.max_chunk_bytes}")
        if data.offset != self.received:
            raise MalformedStream(
                f"chunk at offset {data.offset} but {self.received} bytes were received so far: chunks must arrive "
                f"in order without gaps"
            )
        raw = self._decode(data.data)
        if self.received + len(raw) > self.header.total_bytes:
            raise PayloadTooLarge(
                f"stream carries more than the {self.header.total_bytes} bytes its header announced"
            )
        self.received += len(raw)
        self._hash.update(raw)
        return raw

    def _decode(self, data: bytes) -> bytes:
        if self.header.encoding != pb.CHUNK_ENCODING_ZLIB:
            return data
        inflater = zlib.decompressobj()
        try:
            # Bounded: a small compressed chunk must not inflate past the chunk limit.
            raw = inflater.decompress(data, self.max_chunk_bytes)
        except zlib.error as exc:
            raise MalformedStream(f"zlib chunk at offset {self.received} cannot be decompressed: {exc}") from None
        if not inflater.eof:
            # Either more output is waiting (too large) or the compressed data stops short (truncated).
            if inflater.unconsumed_tail or inflater.decompress(b"", 1):
                raise PayloadTooLarge(f"zlib chunk inflates past the chunk limit of {self.max_chunk_bytes} bytes")
            raise MalformedStream(f"zlib chunk at offset {self.received} is truncated")
        return raw

    def finish(self) -> None:
        """Call at end of stream: the payload must be complete and match its digest."""
        if self.header is None:
            raise MalformedStream("empty weight stream: no header received")
        if self.received != self.header.total_bytes:
            raise MalformedStream(
                f"weight stream ended after {self.received} of {self.header.total_bytes} bytes; nothing was applied"
            )
        digest = DIGEST_PREFIX + self._hash.hexdigest()
        if digest != self.header.digest:
            raise DigestMismatch(f"payload digest {digest} does not match the header's {self.header.digest}")


def _check_manifest(got: Sequence[TensorMeta], expected: Sequence[TensorMeta]) -> None:
    got_names = [m.name for m in got]
    want_names = [m.name for m in expected]
    if got_names != want_names:
        missing = sorted(set(want_names) - set(got_names))
        extra = sorted(set(got_names) - set(want_names))
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same tensors in another order"
        raise ManifestMismatch(f"tensor names differ from the model's: {detail}")
    for g, w in zip(got, expected):
        if g.dtype != w.dtype or g.shape != w.shape:
            raise ManifestMismatch(
                f"{g.name}: expected {w.dtype}{list(w.shape)}, got {g.dtype}{list(g.shape)}"
            )


def read_state_dict(reader: StreamReader, chunks: Iterator[pb.WeightsChunk]) -> dict[str, torch.Tensor]:
    """Read a whole stream into a fresh state_dict (for tests and tools; services use `Assembler`)."""
    assembler = Assembler(reader)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


class Assembler:
    """Collects a validated stream into one buffer; tensors exist only once the stream checked out whole."""

    def __init__(self, reader: StreamReader):
        self.reader = reader
        self._buf: bytearray | None = None

    def add(self, chunk: pb.WeightsChunk) -> None:
        offset = self.reader.received
        raw = self.reader.accept(chunk)
        if raw is None:
            self._buf = bytearray(self.reader.header.total_bytes)
        else:
            self._buf[offset : offset + len(raw)] = raw

    def finish(self) -> dict[str, torch.Tensor]:
        self.reader.finish()
        state = tensors_from_buffer(self.reader.manifest, self._buf)
        check_finite(state)
        return state


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


def state_dict_from_payload(header: pb.WeightsHeader, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
    """A whole payload received in one piece (a model downloaded from the coordinator), checked against its header:
    the manifest's sizes and the digest."""
    manifest = [_meta_from_proto(spec) for spec in header.tensors]
    expected = sum(m.nbytes for m in manifest)
    if expected != len(payload) or header.total_bytes != len(payload):
        raise MalformedStream(f"received {len(payload)} bytes; the header announces {header.total_bytes} and its "
                              f"tensors hold {expected}")
    digest = DIGEST_PREFIX + hashlib.sha256(payload).hexdigest()
    if digest != header.digest:
        raise DigestMismatch(f"payload digest {digest} does not match the header's {header.digest}")
    return tensors_from_buffer(manifest, bytearray(payload))
