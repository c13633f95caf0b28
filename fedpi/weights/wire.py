"""WeightsChunk messages to and from their bytes on the wire, data chunks by hand.

A data chunk is almost all payload. Protobuf would copy that payload once more on each side: into a `bytes` for the
field before serialising, and out of the received message on every read of the field. By hand, a data chunk is
written with one copy (the payload joined behind a few bytes of tags and lengths) and read with none: its data is a
view of the message gRPC received. The bytes are exactly protobuf's, so any client (grpcurl, another language) can
send and read them; what the fast path does not recognise as a plain data chunk goes to protobuf as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from generated.fedpi.v1 import worker_pb2 as pb

_DATA = 2 << 3 | 2  # WeightsChunk.data: field 2, length-delimited
_OFFSET = 1 << 3  # WeightsData.offset: field 1, varint
_BYTES = 2 << 3 | 2  # WeightsData.data: field 2, length-delimited


class Data(NamedTuple):
    """A data chunk as read off the wire: `data` is a view of the received message, not a copy."""

    offset: int
    data: memoryview


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # an int64 below zero is ten bytes of two's complement, as protobuf writes it
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_data(offset: int, pieces: Sequence[bytes | memoryview]) -> bytes:
    """The wire bytes of WeightsChunk(data=WeightsData(offset, data=the pieces joined)), with one copy of the pieces.
    Default values are left out, as protobuf leaves them out."""
    size = sum(len(p) for p in pieces)
    inner = (bytes((_OFFSET,)) + _varint(offset) if offset else b"") + (
        bytes((_BYTES,)) + _varint(size) if size else b""
    )
    return b"".join((bytes((_DATA,)), _varint(len(inner) + size), inner, *pieces))


def to_wire(message: pb.WeightsChunk | bytes) -> bytes:
    """A serialiser for weight streams that also passes on messages already encoded."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def from_wire(message: bytes) -> pb.WeightsChunk | Data:
    """A deserialiser for weight streams: a plain data chunk as Data, anything else (a header, a trailer, a data chunk
    with fields this reader does not expect, a malformed message) through protobuf, which raises on what is broken."""
    return _data_chunk(message) or pb.WeightsChunk.FromString(message)


def _data_chunk(message: bytes) -> Data | None:
    view = memoryview(message)
    if not view or view[0] != _DATA:
        return None
    length, pos = _read_varint(view, 1)
    if pos + length != len(view):  # more than one field (or a broken one): protobuf's rules apply
        return None
    offset, data = 0, view[pos:pos]
    while pos < len(view):
        key, pos = _read_varint(view, pos)
        if key == _OFFSET:
            offset, pos = _read_varint(view, pos)
            offset -= (offset >> 63) << 64  # int64
        elif key == _BYTES:
            size, pos = _read_varint(view, pos)
            data, pos = view[pos : pos + size], pos + size  # past the end: the check below refuses it
        else:
            return None
    return Data(offset, data) if pos == len(view) else None


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it); a varint that runs off the end or past ten bytes reads as too long to fit."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(view))):
        value |= (view[i] & 0x7F) << shift
        if view[i] < 0x80:
            return value & ((1 << 64) - 1), i + 1
        shift += 7
    return 1 << 64, len(view) + 1
