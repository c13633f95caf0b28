"""The sending side: a state_dict as a payload, cut into chunks, each encoding serialised once for every receiver."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from fedpi.weights import compression, wire
from fedpi.weights.digests import (
    DIGESTS,
    digest_of,
)
from fedpi.weights.manifest import (
    TensorMeta,
    manifest_of,
)
from generated.fedpi.v1 import worker_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20


def byte_view(t: torch.Tensor) -> memoryview:
    # reshape(-1) first: a 0-d tensor cannot be reinterpreted as bytes directly.
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


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
        self._views = [byte_view(t) for t in self._flat]
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
        base: Sequence[torch.Tensor | None] | None = None,
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
