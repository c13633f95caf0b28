"""Data chunks written and read by hand: the same bytes as protobuf's, read the same way, or left to protobuf."""

from __future__ import annotations

import random

import pytest
import torch
from google.protobuf.message import DecodeError

from fedpi.weights import serde, wire
from generated.fedpi.v1 import worker_pb2 as pb


def _as_protobuf_reads(message: bytes):
    """(offset, data) of a data chunk, the kind of anything else, or the exception: what protobuf makes of it."""
    try:
        chunk = pb.WeightsChunk.FromString(message)
    except DecodeError:
        return DecodeError
    kind = chunk.WhichOneof("kind")
    return (chunk.data.offset, chunk.data.data) if kind == "data" else kind


def _as_wire_reads(message: bytes):
    try:
        chunk = wire.from_wire(message)
    except DecodeError:
        return DecodeError
    if isinstance(chunk, wire.Data):
        return chunk.offset, bytes(chunk.data)
    kind = chunk.WhichOneof("kind")
    return (chunk.data.offset, chunk.data.data) if kind == "data" else kind


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 1 << 20, 1 << 40, (1 << 63) - 1, -1, -(1 << 63)])
@pytest.mark.parametrize("sizes", [[], [1], [127, 1], [128], [1 << 20], [5, 0, 1 << 16]])
def test_a_data_chunk_is_written_as_protobuf_writes_it_and_read_as_protobuf_reads_it(offset, sizes):
    rng = random.Random(offset ^ len(sizes))
    pieces = [memoryview(rng.randbytes(n)) if i % 2 else rng.randbytes(n) for i, n in enumerate(sizes)]
    expected = pb.WeightsChunk(data=pb.WeightsData(offset=offset, data=b"".join(pieces))).SerializeToString()
    message = wire.encode_data(offset, pieces)
    assert message == expected
    chunk = wire.from_wire(message)
    assert isinstance(chunk, wire.Data) and (chunk.offset, bytes(chunk.data)) == (offset, b"".join(pieces))


def test_a_data_chunk_is_read_as_a_view_of_the_message_not_a_copy():
    message = wire.encode_data(4096, [bytes(range(256)) * 4])
    chunk = wire.from_wire(message)
    assert chunk.data.obj is message and bytes(chunk.data) == bytes(range(256)) * 4


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    return wire._varint(number << 3 | wire_type) + body


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, wire._varint(len(data)) + data)


def _odd_messages() -> dict[str, bytes]:
    """Valid encodings of WeightsChunk that a hand-written fast path could get wrong."""
    data = b"\x01\x02\x03\x04"
    inner = _field(1, 0, wire._varint(8)) + _bytes_field(2, data)
    return {
        "fields in reverse order": _bytes_field(2, _bytes_field(2, data) + _field(1, 0, wire._varint(8))),
        "a field repeated: the last wins": _bytes_field(2, _bytes_field(2, b"old") + inner),
        "an unknown varint field": _bytes_field(2, inner + _field(9, 0, wire._varint(5))),
        "an unknown fixed64 field": _bytes_field(2, _field(9, 1, bytes(8)) + inner),
        "an unknown fixed32 field": _bytes_field(2, inner + _field(9, 5, bytes(4))),
        "an unknown bytes field": _bytes_field(2, _bytes_field(15, b"xyz") + inner),
        "data given twice: protobuf merges": _bytes_field(2, inner) + _bytes_field(2, _field(1, 0, wire._varint(16))),
        "a header after data: the oneof's last wins": _bytes_field(2, inner) + _bytes_field(1, b""),
        "data after a header": _bytes_field(1, b"") + _bytes_field(2, inner),
        "an unknown top-level field": _bytes_field(2, inner) + _field(7, 0, b"\x01"),
        "a non-minimal varint length": bytes((0x12, 0x80 | len(inner), 0x00)) + inner,
        "an empty data chunk": _bytes_field(2, b""),
        "a header": pb.WeightsChunk(header=pb.WeightsHeader(round=3, total_bytes=4)).SerializeToString(),
        "a trailer": pb.WeightsChunk(trailer=pb.WeightsTrailer(digest="xxh3_128:00")).SerializeToString(),
        "nothing": b"",
        "an offset of ten bytes": _bytes_field(2, _field(1, 0, b"\xff" * 9 + b"\x01") + _bytes_field(2, data)),
    }


@pytest.mark.parametrize("name", list(_odd_messages()))
def test_any_valid_encoding_reads_as_protobuf_reads_it(name):
    message = _odd_messages()[name]
    assert _as_wire_reads(message) == _as_protobuf_reads(message) != DecodeError


def test_broken_messages_fail_as_protobuf_fails_and_nothing_else_is_read_differently():
    """Every truncation, and thousands of random byte flips, of data chunks: the same reading or the same error."""
    rng = random.Random(7)
    seeds = [wire.encode_data(offset, [rng.randbytes(n)]) for offset, n in [(0, 3), (5, 200), (1 << 35, 17), (-1, 2)]]
    seeds += list(_odd_messages().values())
    for message in seeds:
        for cut in range(len(message)):
            assert _as_wire_reads(message[:cut]) == _as_protobuf_reads(message[:cut]), (message, cut)
        for _ in range(500):
            broken = bytearray(message)
            for _ in range(rng.randint(1, 3)):
                if broken:
                    broken[rng.randrange(len(broken))] = rng.getrandbits(8)
            broken = bytes(broken)
            assert _as_wire_reads(broken) == _as_protobuf_reads(broken), (message, broken)


@pytest.mark.parametrize("encoding", [pb.CHUNK_ENCODING_RAW, pb.CHUNK_ENCODING_ZLIB, pb.CHUNK_ENCODING_FP16])
def test_a_stream_sent_encoded_is_the_stream_protobuf_would_send(encoding):
    state = {"w": torch.randn(1000), "b": torch.arange(10, dtype=torch.int64), "h": torch.randn(7).half()}
    payload = serde.WeightsPayload(state, round=2, architecture="m")
    chunks = list(payload.chunks(300, encoding, trailer="xxh3_128"))
    encoded = list(payload.chunks(300, encoding, trailer="xxh3_128", encoded=True))
    assert [c.SerializeToString() for c in chunks] == encoded
    reader = serde.StreamReader(architecture="m", expected=payload.manifest, encodings=(encoding,))
    got = serde.read_state_dict(reader, encoded)
    sent = serde.read_state_dict(
        serde.StreamReader(architecture="m", expected=payload.manifest, encodings=(encoding,)), chunks
    )
    assert all(torch.equal(got[k], sent[k]) for k in state)
