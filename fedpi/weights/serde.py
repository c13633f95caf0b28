"""Tensors <-> chunked weight streams: a header with the tensor manifest and a digest, then raw bytes in chunks.

Never pickle: the payload is the little-endian bytes of each tensor, in manifest order, so any fedpi release can
read any other's weights and a bad stream is caught by plain checks, not by a deserialiser crash. Both services use
this module: the worker to install and send weights, the coordinator to send and to fold weights into FedAvg.
"""

from __future__ import annotations

import cmath
import functools
import hashlib
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import xxhash

from fedpi.weights import compression, wire
from generated.fedpi.v1 import worker_pb2 as pb

# Received chunks are read through read-only views, never written: torch's warning about that does not apply.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
DIGEST_PREFIX = "sha256:"
# The digests a stream may carry. sha256 everywhere; since protocol 1.5 also BLAKE2b-512, about twice as fast on CPUs
# without SHA instructions (a Raspberry Pi 4); since 1.6 also XXH3-128, over twenty times faster than either. A digest
# here catches bytes corrupted in transit or in memory: a sender can always send a matching digest for bytes it made up
# (the update checks deal with that), and TLS authenticates the bytes on the wire. A checksum does this job.
DIGESTS: dict[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256,
    "blake2b": hashlib.blake2b,
    "xxh3_128": xxhash.xxh3_128,
}
DIGESTS_BEFORE_1_6 = ("sha256", "blake2b")
SUPPORTED_ENCODINGS = (pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB, *compression.LOSSY)
# What SetWeights accepts: an int8 delta needs a base the receiver of the global model does not have.
MODEL_ENCODINGS = (pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB, compression.FP16, compression.BF16)

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
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def digest_of(views: Sequence[memoryview]) -> str:
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return DIGEST_PREFIX + h.hexdigest()


@functools.cache
def digests_by_speed() -> tuple[str, ...]:
    """DIGESTS, fastest first on this CPU, measured once on 4 MiB: sha256 beats blake2b where the CPU has SHA
    instructions (x86-64 with SHA-NI, ARMv8.2 such as a Pi 5), not where it lacks them (a Pi 4)."""
    data = bytes(4 << 20)

    def seconds(name: str) -> float:
        start = time.perf_counter()
        DIGESTS[name](data).digest()
        return time.perf_counter() - start

    return tuple(sorted(DIGESTS, key=lambda name: min(seconds(name) for _ in range(3))))


def fastest_digest(accepted: Iterable[str] = tuple(DIGESTS)) -> str | None:
    """The digest this CPU computes fastest of those `accepted` (None if it knows none of them)."""
    accepted = set(accepted)
    return next((name for name in digests_by_speed() if name in accepted), None)


class WeightsPayload:
    """A state_dict prepared once for sending: manifest and byte views, no copy of the tensors.

    The same payload can be streamed to any number of receivers; each call to `chunks` copies one chunk at a time.
    Its sha256 digest is computed on first use; a stream with its digest in a trailer hashes as it sends instead.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        round: int,
        architecture: str,
        round_id: str = "",
        trained: bool = False,
    ):
        self.round = round
        self.round_id = round_id
        self.trained = trained
        self.architecture = architecture
        self.manifest = manifest_of(state_dict)
        self._flat = [t.detach().contiguous().reshape(-1) for t in state_dict.values()]
        self._views = [_byte_view(t) for t in self._flat]
        self.total_bytes = sum(m.nbytes for m in self.manifest)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = digest_of(self._views)
        return self._digest

    def header(self, encoding: int = pb.CHUNK_ENCODING_RAW, digest: str | None = None) -> pb.WeightsHeader:
        return pb.WeightsHeader(
            round=self.round,
            model_architecture=self.architecture,
            tensors=[m.to_proto() for m in self.manifest],
            total_bytes=self.total_bytes,
            digest=self.digest if digest is None else digest,
            encoding=encoding,  # type: ignore[arg-type]  # an enum's number, as protobuf takes it
            round_id=self.round_id,
            trained=self.trained,
        )

    def broadcast(
        self,
        receivers: int,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        encoding: int = pb.CHUNK_ENCODING_RAW,
        trailer: str | None = None,
    ) -> Broadcast:
        """The stream of `chunks`, serialised once for `receivers` receivers."""
        return Broadcast(functools.partial(self.chunks, chunk_size, encoding, trailer=trailer, encoded=True), receivers)

    def chunks(
        self,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        encoding: int = pb.CHUNK_ENCODING_RAW,
        *,
        trailer: str | None = None,
        base: Sequence[torch.Tensor] | None = None,
        residual: Sequence[torch.Tensor | None] | None = None,
        encoded: bool = False,
    ) -> OutgoingStream:
        """The stream: header, data chunks, and with `trailer` (a name in DIGESTS) a trailer holding the digest,
        which lossy encodings always send (their digest is of the decoded values). `base` and `residual` (flat, in
        manifest order) are what int8 deltas are taken from and the error fed back into them. `encoded`: messages as
        their bytes on the wire (`wire.to_wire` sends them as they are), with one copy of each chunk's data less."""
        if chunk_size <= 0:
            raise ValueError(f"chunk size must be positive, got {chunk_size}")
        if encoding == compression.INT8 and base is None:
            raise ValueError("int8 deltas need the weights they are a delta from")
        if encoding in compression.LOSSY:
            trailer = trailer or "sha256"
        return OutgoingStream(self, self._data(chunk_size, encoding, base, residual), encoding, trailer, encoded)

    def _data(self, chunk_size: int, encoding: int, base, residual) -> Iterator[_Chunk]:
        if encoding not in compression.LOSSY:
            offset = 0
            for pieces in _cut(self._views, chunk_size):
                size = sum(len(p) for p in pieces)
                if encoding == pb.CHUNK_ENCODING_ZLIB:
                    data = zlib.compress(b"".join(pieces), 1)
                    yield _Chunk(offset, [data], pieces, len(data))
                else:  # the tensors' own bytes, copied once: into the message
                    yield _Chunk(offset, pieces, pieces, size)
                offset += size
            return
        starts = [0]
        for m in self.manifest:
            starts.append(starts[-1] + m.nbytes)
        for p in compression.pieces(
            [m.numel for m in self.manifest], [m.torch_dtype for m in self.manifest], chunk_size, encoding
        ):
            span = slice(p.start, p.start + p.count)
            of_base = base[p.index] if base is not None else None
            carried = residual[p.index] if residual is not None else None
            data, decoded = compression.encode(
                self._flat[p.index][span],
                encoding,
                of_base[span] if of_base is not None else None,
                carried[span] if carried is not None else None,
            )
            offset = starts[p.index] + p.start * self.manifest[p.index].itemsize
            yield _Chunk(offset, [data], [compression.raw_view(decoded)], len(data))


class _Chunk(NamedTuple):
    offset: int
    data: Sequence[bytes | memoryview]  # what WeightsData.data holds, in pieces to be joined
    decoded: Sequence[bytes | memoryview]  # the raw payload bytes it stands for, which the digest is of
    wire_bytes: int


class OutgoingStream:
    """One stream of a payload (an iterator of WeightsChunk, or with `encoded` of their bytes on the wire), counting
    the chunk data bytes it has produced."""

    def __init__(
        self, payload: WeightsPayload, data: Iterator[_Chunk], encoding: int, trailer: str | None, encoded: bool = False
    ):
        self.wire_bytes = 0
        self._messages = self._stream(payload, data, encoding, trailer, encoded)

    def __iter__(self) -> OutgoingStream:
        return self

    def __next__(self) -> pb.WeightsChunk | bytes:
        return next(self._messages)

    def _stream(
        self, payload: WeightsPayload, data: Iterator[_Chunk], encoding: int, trailer: str | None, encoded: bool
    ) -> Iterator[pb.WeightsChunk | bytes]:
        out = wire.to_wire if encoded else (lambda message: message)
        hasher = DIGESTS[trailer]() if trailer else None
        yield out(pb.WeightsChunk(header=payload.header(encoding, digest=f"{trailer}:" if trailer else None)))
        for chunk in data:
            self.wire_bytes += chunk.wire_bytes
            if hasher is not None:
                for piece in chunk.decoded:
                    hasher.update(piece)
            if encoded:
                yield wire.encode_data(chunk.offset, chunk.data)
            else:
                yield pb.WeightsChunk(data={"offset": chunk.offset, "data": b"".join(chunk.data)})
        if hasher is not None:
            yield out(pb.WeightsChunk(trailer=pb.WeightsTrailer(digest=f"{trailer}:{hasher.hexdigest()}")))


class Broadcast:
    """One stream of a payload, serialised once for several receivers (the global model for every worker of a round):
    each message is serialised when the first receiver needs it and dropped once every receiver has taken it.

    `receivers` calls to `receiver` share the stream; any further call gets a stream of its own. A receiver that stops
    early holds back the dropping of later messages until the broadcast itself is dropped."""

    def __init__(self, make: Callable[[], OutgoingStream], receivers: int):
        self._make = make
        self._stream = make()
        self._messages: dict[int, bytes] = {}  # by index, until every receiver has taken it
        self._made = 0
        self._taken: list[int] = []  # per receiver, the messages it has taken
        self._receivers = receivers

    @property
    def wire_bytes(self) -> int:
        """Bytes of chunk data in the stream (each receiver that finished got all of them)."""
        return self._stream.wire_bytes

    def receiver(self) -> Iterator[bytes]:
        if len(self._taken) == self._receivers:
            return self._make()
        self._taken.append(0)
        return self._receive(len(self._taken) - 1)

    def _receive(self, me: int) -> Iterator[bytes]:
        i = 0
        while True:
            if i == self._made:
                message = next(self._stream, None)
                if message is None:
                    return
                self._messages[i] = message
                self._made += 1
            data = self._messages[i]
            self._taken[me] = i + 1
            if len(self._taken) == self._receivers and min(self._taken) > i:
                del self._messages[i]
            yield data
            i += 1


def piece_sizes(manifest: Sequence[TensorMeta], chunk_size: int, encoding: int) -> Iterator[int]:
    """The decoded size of each data chunk of a payload sent with `chunk_size` and `encoding`."""
    if encoding not in compression.LOSSY:
        total = sum(m.nbytes for m in manifest)
        for offset in range(0, total, chunk_size):
            yield min(chunk_size, total - offset)
        return
    dtypes = [m.torch_dtype for m in manifest]
    for p in compression.pieces([m.numel for m in manifest], dtypes, chunk_size, encoding):
        yield p.count * dtypes[p.index].itemsize


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


class StreamReader:
    """Checks a weight stream message by message; yields validated raw byte segments to its caller.

    `expected` is the manifest the receiver's model has; the header must match it exactly. Nothing is trusted
    until `finish` has checked length and digest, so callers must treat earlier segments as provisional.
    `encodings` are the chunk encodings accepted; int8 deltas also need `base`, the flat tensors they are from.
    """

    def __init__(
        self,
        *,
        architecture: str,
        expected: Sequence[TensorMeta] | None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        encodings: Sequence[int] = MODEL_ENCODINGS,
        base: Sequence[torch.Tensor] | None = None,
    ):
        self.architecture = architecture
        self.expected = list(expected) if expected is not None else None
        self.max_chunk_bytes = max_chunk_bytes
        self.max_payload_bytes = max_payload_bytes
        self.encodings = (pb.CHUNK_ENCODING_UNSPECIFIED, *encodings)
        self.base = base
        self.header: pb.WeightsHeader | None = None
        self.manifest: list[TensorMeta] = []
        self.received = 0  # decoded bytes
        self.wire_bytes = 0  # bytes of chunk data as they crossed the network
        self.digest = ""  # the digest announced: the header's, or the trailer's once it arrived
        self._hash: Any = None
        self._tensor, self._element = 0, 0  # where the next lossy chunk starts

    @property
    def started(self) -> pb.WeightsHeader:
        """The header, once it has arrived: data chunks and the trailer are refused before it."""
        if self.header is None:
            raise MalformedStream("data before the header: a weight stream must start with a WeightsHeader")
        return self.header

    def accept(self, chunk: pb.WeightsChunk | wire.Data | bytes) -> bytes | memoryview | None:
        """Validate one message (as parsed, or its bytes on the wire); return the raw bytes of a data chunk (None for
        the header and the trailer)."""
        if isinstance(chunk, bytes):
            chunk = wire.from_wire(chunk)
        if isinstance(chunk, wire.Data):
            if self.header is None:
                raise MalformedStream("data before the header: a weight stream must start with a WeightsHeader")
            return self._accept_data(chunk)
        kind = chunk.WhichOneof("kind")
        if kind == "header":
            self._accept_header(chunk.header)
            return None
        if kind not in ("data", "trailer"):
            raise MalformedStream("empty WeightsChunk: set either header or data")
        if self.header is None:
            raise MalformedStream(f"{kind} before the header: a weight stream must start with a WeightsHeader")
        if kind == "trailer":
            self._accept_trailer(chunk.trailer)
            return None
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
        if header.encoding not in self.encodings:
            raise MalformedStream(
                f"chunk encoding {header.encoding} is unknown or not accepted here (accepted: "
                f"{', '.join(compression.NAMES.get(e, str(e)) for e in self.encodings[1:])})"
            )
        if header.encoding == compression.INT8 and self.base is None:
            raise MalformedStream("int8 deltas need the weights they are a delta from, which this receiver lacks")
        algorithm, _, hex_digest = header.digest.partition(":")
        if algorithm not in DIGESTS:
            raise MalformedStream(
                f"digest must be '<algorithm>:<hex>' with algorithm {' or '.join(DIGESTS)}, got {header.digest[:80]!r}"
            )
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
        self.digest = header.digest
        self._hash = DIGESTS[algorithm]()

    @property
    def hashes_fast(self) -> bool:
        """Whether the stream's digest costs little next to copying its bytes (once its header has named it)."""
        return self.digest.startswith("xxh3_128:")

    @property
    def _trailer_expected(self) -> bool:
        return self.digest.endswith(":")

    def _accept_trailer(self, trailer: pb.WeightsTrailer) -> None:
        if not self._trailer_expected:
            raise MalformedStream("trailer in a stream whose header carried its digest (or a second trailer)")
        if self.received != self.started.total_bytes:
            raise MalformedStream(
                f"trailer after {self.received} of {self.started.total_bytes} bytes: it must come last"
            )
        if not trailer.digest.startswith(self.digest) or trailer.digest == self.digest:
            raise MalformedStream(
                f"the trailer's digest {trailer.digest[:80]!r} is not the {self.digest[:-1]} "
                f"digest the header announced"
            )
        self.digest = trailer.digest

    def _accept_data(self, data: pb.WeightsData | wire.Data) -> bytes | memoryview:
        assert self.header is not None
        sent = data.data  # as it crossed the network; read once: each read of a bytes field makes a new object
        if len(sent) > self.max_chunk_bytes:
            raise PayloadTooLarge(f"chunk of {len(sent)} bytes exceeds the limit of {self.max_chunk_bytes}")
        if data.offset != self.received:
            raise MalformedStream(
                f"chunk at offset {data.offset} but {self.received} bytes were received so far: chunks must arrive "
                f"in order without gaps"
            )
        raw = self._decode_piece(sent) if self.started.encoding in compression.LOSSY else self._decode(sent)
        if self.received + len(raw) > self.started.total_bytes:
            raise PayloadTooLarge(f"stream carries more than the {self.started.total_bytes} bytes its header announced")
        self.received += len(raw)
        self.wire_bytes += len(sent)
        self._hash.update(raw)
        return raw

    def _decode(self, data: bytes | memoryview) -> bytes | memoryview:
        if self.started.encoding != pb.CHUNK_ENCODING_ZLIB:
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

    def _decode_piece(self, data: bytes | memoryview) -> memoryview:
        """A lossy chunk: elements of the tensor where the last chunk stopped, decoded into its dtype."""
        while self._tensor < len(self.manifest) and self._element == self.manifest[self._tensor].numel:
            self._tensor, self._element = self._tensor + 1, 0
        if self._tensor == len(self.manifest):
            raise PayloadTooLarge(f"stream carries more than the {self.started.total_bytes} bytes its header announced")
        meta, encoding = self.manifest[self._tensor], self.started.encoding
        left = meta.numel - self._element
        base = None
        if encoding == compression.INT8 and compression.encoded(meta.torch_dtype, encoding):
            values_sent = len(data) - compression.SCALE_BYTES
            if self.base is None:
                raise MalformedStream("an int8 delta needs the weights it was computed from; none are held here")
            base = self.base[self._tensor][self._element : self._element + min(max(values_sent, 0), left)]
        try:
            values = compression.decode(data, meta.torch_dtype, encoding, base)
        except ValueError as exc:
            raise MalformedStream(f"{meta.name}: chunk at element {self._element}: {exc}") from None
        if not 0 < len(values) <= left:
            raise MalformedStream(
                f"{meta.name}: a chunk of {len(values)} elements at element {self._element} does "
                f"not fit the {left} left in the tensor (a lossy chunk holds one tensor's elements)"
            )
        self._element += len(values)
        return compression.raw_view(values)

    def finish(self) -> None:
        """Call at end of stream: the payload must be complete and match its digest."""
        if self.header is None:
            raise MalformedStream("empty weight stream: no header received")
        if self.received != self.header.total_bytes:
            raise MalformedStream(
                f"weight stream ended after {self.received} of {self.header.total_bytes} bytes; nothing was applied"
            )
        if self._trailer_expected:
            raise MalformedStream("weight stream ended without the trailer its header announced; nothing was applied")
        digest = f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if digest != self.digest:
            raise DigestMismatch(f"payload digest {digest} does not match the announced {self.digest}")


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
            raise ManifestMismatch(f"{g.name}: expected {w.dtype}{list(w.shape)}, got {g.dtype}{list(g.shape)}")


def is_header(chunk: pb.WeightsChunk | wire.Data) -> bool:
    return isinstance(chunk, pb.WeightsChunk) and chunk.HasField("header")


def read_state_dict(reader: StreamReader, chunks: Iterator[pb.WeightsChunk]) -> dict[str, torch.Tensor]:
    """Read a whole stream into a fresh state_dict (for tests and tools; services use `Assembler`)."""
    assembler = Assembler(reader)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


class Assembler:
    """Collects a validated stream into one buffer; tensors exist only once the stream checked out whole."""

    def __init__(self, reader: StreamReader, buffer: bytearray | None = None):
        """`buffer`: memory to assemble in if it is large enough, e.g. the last upload's: a fresh model-sized buffer
        costs a page fault per 4 KiB, a large share of an upload's CPU time."""
        self.reader = reader
        self._spare = buffer
        self._buf: bytearray | None = None

    def add(self, chunk: pb.WeightsChunk | wire.Data | bytes) -> None:
        if isinstance(chunk, bytes):
            chunk = wire.from_wire(chunk)
        offset = self.reader.received
        raw = self.reader.accept(chunk)
        if is_header(chunk):
            total = self.reader.started.total_bytes
            spare = self._spare
            self._buf = spare if spare is not None and len(spare) >= total else bytearray(total)
        elif raw is not None and self._buf is not None:  # the reader refuses data before a header
            self._buf[offset : offset + len(raw)] = raw

    @property
    def buffer(self) -> bytearray | None:
        return self._buf

    def finish(self) -> dict[str, torch.Tensor]:
        self.reader.finish()  # a stream without a header fails here: _buf is set by then
        state = tensors_from_buffer(self.reader.manifest, self._buf or bytearray())
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
        raise MalformedStream(
            f"received {len(payload)} bytes; the header announces {header.total_bytes} and its tensors hold {expected}"
        )
    digest = DIGEST_PREFIX + hashlib.sha256(payload).hexdigest()
    if digest != header.digest:
        raise DigestMismatch(f"payload digest {digest} does not match the header's {header.digest}")
    return tensors_from_buffer(manifest, bytearray(payload))
