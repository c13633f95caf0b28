"""The receiving side: a weight stream checked chunk by chunk (order, sizes, encoding, digest), and assembled into
tensors only once it checked out whole."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedpi.weights import compression, wire
from fedpi.weights.digests import (
    DIGEST_PREFIX,
    DIGESTS,
)
from fedpi.weights.errors import (
    ArchitectureMismatch,
    DigestMismatch,
    MalformedStream,
    PayloadTooLarge,
)
from fedpi.weights.manifest import (
    TensorMeta,
    check_finite,
    check_manifest,
    meta_from_proto,
    tensors_from_buffer,
)
from generated.fedpi.v1 import worker_pb2 as pb

DEFAULT_MAX_CHUNK_BYTES = 4 << 20


DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30


SUPPORTED_ENCODINGS = (pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB, *compression.LOSSY)


# What SetWeights accepts: an int8 delta needs a base the receiver of the global model does not have.
MODEL_ENCODINGS = (pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB, compression.FP16, compression.BF16)


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
        manifest = [meta_from_proto(s) for s in header.tensors]
        total = sum(m.nbytes for m in manifest)
        if header.total_bytes != total:
            raise MalformedStream(f"header says total_bytes={header.total_bytes} but its tensors add up to {total}")
        if total > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {total} bytes exceeds the limit of {self.max_payload_bytes} bytes; "
                f"raise --max-payload-mb on the receiving side if this model is intended"
            )
        if self.expected is not None:
            check_manifest(manifest, self.expected)
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


def state_dict_from_payload(header: pb.WeightsHeader, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
    """A whole payload received in one piece (a model downloaded from the coordinator), checked against its header:
    the manifest's sizes and the digest."""
    manifest = [meta_from_proto(spec) for spec in header.tensors]
    expected = sum(m.nbytes for m in manifest)
    if expected != len(payload) or header.total_bytes != len(payload):
        raise MalformedStream(
            f"received {len(payload)} bytes; the header announces {header.total_bytes} and its tensors hold {expected}"
        )
    digest = DIGEST_PREFIX + hashlib.sha256(payload).hexdigest()
    if digest != header.digest:
        raise DigestMismatch(f"payload digest {digest} does not match the header's {header.digest}")
    return tensors_from_buffer(manifest, bytearray(payload))
