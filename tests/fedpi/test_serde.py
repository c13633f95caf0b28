"""Weight streams: lossless round trips for every dtype, and every kind of broken stream refused."""

from __future__ import annotations

import zlib

import grpc
import pytest
import torch

from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from worker_service.servicer import weights_status

ALL_DTYPES = [getattr(torch, n) for n in serde.supported_dtypes()]


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen) * 100
    if dtype == torch.bool:
        t = base > 0
    elif dtype.is_complex:
        t = torch.complex(base, -base).to(dtype)
    elif dtype.is_floating_point:
        t = base.to(dtype)
    else:
        t = base.abs().to(dtype)
    return {"matrix": t, "scalar": t.flatten()[1].clone().reshape(()), "empty": t[:0], "row": t[0].clone()}


def _reader(payload: serde.WeightsPayload, **limits) -> serde.StreamReader:
    return serde.StreamReader(architecture=payload.architecture, expected=payload.manifest, **limits)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 20])
def test_round_trip_every_dtype_and_chunk_size(dtype, chunk_size):
    """Bytes, dtypes and shapes survive exactly, including 0-d and empty tensors and chunks that split elements."""
    # Prepare
    state = _state(dtype)
    payload = serde.WeightsPayload(state, round=3, architecture="arch")
    # Execute
    out = serde.read_state_dict(_reader(payload), payload.chunks(chunk_size))
    # Assert
    assert _same(state, out)


def test_zlib_encoding_round_trips():
    state = _state(torch.float32)
    payload = serde.WeightsPayload(state, round=1, architecture="arch")
    chunks = list(payload.chunks(16, pb.CHUNK_ENCODING_ZLIB))
    assert chunks[0].header.encoding == pb.CHUNK_ENCODING_ZLIB
    assert _same(state, serde.read_state_dict(_reader(payload), iter(chunks)))


def test_chunks_respect_size_and_offsets():
    payload = serde.WeightsPayload({"w": torch.zeros(1000)}, round=1, architecture="arch")
    data = [c.data for c in payload.chunks(999)][1:]
    assert [d.offset for d in data] == [0, 999, 1998, 2997, 3996]
    assert [len(d.data) for d in data] == [999, 999, 999, 999, 4]


def _chunks(payload, size=8):
    return list(payload.chunks(size))


@pytest.fixture
def payload() -> serde.WeightsPayload:
    return serde.WeightsPayload({"a": torch.arange(10.0), "b": torch.ones(2, 3)}, round=2, architecture="arch")


def test_truncated_stream_rejected(payload):
    chunks = _chunks(payload)[:-2]
    with pytest.raises(serde.MalformedStream, match="ended after"):
        serde.read_state_dict(_reader(payload), iter(chunks))


def test_corrupted_byte_rejected_by_digest(payload):
    chunks = _chunks(payload)
    bad = bytearray(chunks[2].data.data)
    bad[0] ^= 0xFF
    chunks[2] = pb.WeightsChunk(data=pb.WeightsData(offset=chunks[2].data.offset, data=bytes(bad)))
    with pytest.raises(serde.DigestMismatch) as err:
        serde.read_state_dict(_reader(payload), iter(chunks))
    assert weights_status(err.value) == grpc.StatusCode.DATA_LOSS


@pytest.mark.parametrize("digest", ["sha256", "blake2b", "xxh3_128"])
def test_a_corrupted_byte_is_caught_by_every_digest_in_a_trailer(payload, digest):
    chunks = list(payload.chunks(8, trailer=digest))
    bad = bytearray(chunks[2].data.data)
    bad[3] ^= 0x01
    chunks[2] = pb.WeightsChunk(data=pb.WeightsData(offset=chunks[2].data.offset, data=bytes(bad)))
    with pytest.raises(serde.DigestMismatch):
        serde.read_state_dict(_reader(payload), iter(chunks))


def test_a_broadcast_gives_every_receiver_the_stream_and_keeps_no_message_all_have_taken(payload):
    """The same bytes as serialising the stream for each receiver; a message is dropped once every receiver has taken
    it, so receivers that keep pace hold one chunk of the model, not all of it."""
    alone = [c.SerializeToString() for c in payload.chunks(8, trailer="xxh3_128")]
    broadcast = payload.broadcast(2, 8, trailer="xxh3_128")
    first, second = broadcast.receiver(), broadcast.receiver()
    got_first, got_second, held = [], [], []
    for _ in alone:  # in step: each message is dropped as soon as the slower receiver has it
        got_first.append(next(first))
        got_second.append(next(second))
        held.append(len(broadcast._messages))
    assert next(first, None) is None and next(second, None) is None
    assert got_first == got_second == alone and max(held) == 0
    assert broadcast.wire_bytes == payload.total_bytes
    assert list(broadcast.receiver()) == alone  # a receiver past the count is sent a stream of its own
    ahead = payload.broadcast(2, 8)
    list(ahead.receiver())
    assert len(ahead._messages) == len(alone) - 1  # (no trailer) the other receiver has not taken them yet
    received = serde.read_state_dict(_reader(payload), (pb.WeightsChunk.FromString(m) for m in ahead.receiver()))
    assert _same(received, {"a": torch.arange(10.0), "b": torch.ones(2, 3)}) and not ahead._messages


def test_reordered_chunks_rejected(payload):
    chunks = _chunks(payload)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(serde.MalformedStream, match="in order"):
        serde.read_state_dict(_reader(payload), iter(chunks))


def test_oversized_stream_rejected(payload):
    chunks = _chunks(payload)
    extra = pb.WeightsChunk(data=pb.WeightsData(offset=payload.total_bytes, data=b"\0" * 4))
    with pytest.raises(serde.PayloadTooLarge):
        serde.read_state_dict(_reader(payload), iter(chunks + [extra]))


def test_chunk_over_limit_rejected(payload):
    with pytest.raises(serde.PayloadTooLarge) as err:
        serde.read_state_dict(_reader(payload, max_chunk_bytes=16), payload.chunks(32))
    assert weights_status(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_payload_over_limit_rejected_at_header(payload):
    reader = _reader(payload, max_payload_bytes=payload.total_bytes - 1)
    with pytest.raises(serde.PayloadTooLarge, match="max-payload-mb"):
        reader.accept(next(payload.chunks()))


def test_zlib_bomb_rejected(payload):
    reader = _reader(payload, max_chunk_bytes=4096)
    header = payload.header(pb.CHUNK_ENCODING_ZLIB)
    reader.accept(pb.WeightsChunk(header=header))
    bomb = zlib.compress(b"\0" * (1 << 20))
    with pytest.raises(serde.PayloadTooLarge, match="inflates"):
        reader.accept(pb.WeightsChunk(data=pb.WeightsData(offset=0, data=bomb)))


def test_data_before_header_rejected(payload):
    with pytest.raises(serde.MalformedStream, match="before the header"):
        _reader(payload).accept(_chunks(payload)[1])


def test_second_header_rejected(payload):
    reader = _reader(payload)
    first = _chunks(payload)[0]
    reader.accept(first)
    with pytest.raises(serde.MalformedStream, match="second header"):
        reader.accept(first)


def test_empty_stream_rejected(payload):
    with pytest.raises(serde.MalformedStream, match="no header"):
        serde.read_state_dict(_reader(payload), iter([]))


def test_other_architecture_refused(payload):
    reader = serde.StreamReader(architecture="other", expected=None)
    with pytest.raises(serde.ArchitectureMismatch, match="'arch'") as err:
        reader.accept(_chunks(payload)[0])
    assert weights_status(err.value) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "model_state, message",
    [
        ({"a": torch.arange(10.0), "b": torch.ones(3, 2)}, r"b: expected float32\[3, 2\], got float32\[2, 3\]"),
        ({"a": torch.arange(10.0), "b": torch.ones(2, 3, dtype=torch.float64)}, "b: expected float64"),
        ({"a": torch.arange(10.0)}, "unexpected"),
    ],
)
def test_manifest_mismatch_refused(payload, model_state, message):
    reader = serde.StreamReader(architecture="arch", expected=serde.manifest_of(model_state))
    with pytest.raises(serde.ManifestMismatch, match=message):
        reader.accept(_chunks(payload)[0])


def test_header_lying_about_sizes_refused(payload):
    header = payload.header()
    header.tensors[0].byte_length += 4
    with pytest.raises(serde.MalformedStream, match="byte_length"):
        serde.StreamReader(architecture="arch", expected=None).accept(pb.WeightsChunk(header=header))


def test_unknown_dtype_refused(payload):
    header = payload.header()
    header.tensors[0].dtype = "float128"
    with pytest.raises(serde.UnsupportedDtype, match="float128"):
        serde.StreamReader(architecture="arch", expected=None).accept(pb.WeightsChunk(header=header))


def test_nan_weights_refused():
    state = {"w": torch.tensor([1.0, float("nan")])}
    payload = serde.WeightsPayload(state, round=1, architecture="arch")
    with pytest.raises(serde.NonFiniteWeights, match="w holds NaN"):
        serde.read_state_dict(_reader(payload), payload.chunks())


def test_quantized_dtype_is_a_clear_error():
    with pytest.raises(serde.UnsupportedDtype, match="qint8"):
        serde.dtype_name(torch.qint8)


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(1000),
        torch.tensor([1.0, float("nan")]),
        torch.tensor([3e38, 3e38]),  # a sum that overflows
        torch.tensor([3e38, 3e38, float("inf")]),
        torch.tensor([float("inf"), -float("inf")]),
        torch.tensor([60000.0, 60000.0], dtype=torch.float16),
        torch.tensor([1 + 1j, complex(0, float("inf"))]),
        torch.tensor([1.0, float("nan")], dtype=torch.bfloat16),
        torch.arange(5),
        torch.empty(0),
    ],
)
def test_all_finite_agrees_with_isfinite_including_sums_that_overflow(values):
    assert serde.all_finite(values) == bool(torch.isfinite(values).all())
