"""Lossy weight streams: what arrives is what the encoding promises, element by element, and bad streams are refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
import xxhash

from fedpi.weights import compression, serde
from generated.fedpi.v1 import worker_pb2 as pb

ARCH = "tiny"
FP16, BF16, INT8 = compression.FP16, compression.BF16, compression.INT8


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 30, generator=gen),
        "b": torch.randn(30, generator=gen, dtype=torch.float64),
        "count": torch.tensor(7),
        "half": torch.randn(9, generator=gen).half(),
    }


def _flat(state) -> list[torch.Tensor]:
    return [t.reshape(-1).clone() for t in state.values()]


def _receive(chunks, manifest, encodings=serde.SUPPORTED_ENCODINGS, base=None) -> tuple[dict, serde.StreamReader]:
    reader = serde.StreamReader(architecture=ARCH, expected=manifest, encodings=encodings, base=base)
    return serde.read_state_dict(reader, chunks), reader


@pytest.mark.parametrize("encoding, narrow", [(FP16, torch.float16), (BF16, torch.bfloat16)])
@pytest.mark.parametrize("chunk_size", [64, 1000, 1 << 20])
def test_half_precision_transport_delivers_the_rounded_values_in_half_the_bytes(encoding, narrow, chunk_size):
    state = _state()
    payload = serde.WeightsPayload(state, round=1, architecture=ARCH)
    stream = payload.chunks(chunk_size, encoding)
    got, reader = _receive(stream, payload.manifest)
    for name, t in state.items():
        want = t.to(narrow).to(t.dtype) if t.dtype in (torch.float32, torch.float64) else t
        assert got[name].dtype == t.dtype and torch.equal(got[name], want), name
    narrowed = sum(t.numel() for t in state.values() if t.dtype in (torch.float32, torch.float64))
    assert stream.wire_bytes == reader.wire_bytes == payload.total_bytes - narrowed * (4 - 2) - 30 * (8 - 4)
    assert reader.digest.startswith("sha256:")


def test_int8_deltas_land_within_half_a_step_of_the_update_in_a_quarter_of_the_bytes():
    base, update = _state(0), _state(1)
    update["count"] = torch.tensor(8)
    payload = serde.WeightsPayload(update, round=1, architecture=ARCH, trained=True)
    stream = payload.chunks(400, INT8, base=_flat(base), trailer="blake2b")
    chunks = list(stream)
    got, reader = _receive(chunks, payload.manifest, base=_flat(base))
    assert got["count"] == 8  # integers travel raw, not as deltas
    for chunk in chunks:
        if chunk.HasField("data") and len(chunk.data.data) > 4 and chunk.data.offset < 1200 * 4:
            scale = float(torch.frombuffer(bytearray(chunk.data.data[:4]), dtype=torch.float32))
            start = chunk.data.offset // 4
            n = len(chunk.data.data) - 4
            delta = (update["w"].reshape(-1) - base["w"].reshape(-1))[start : start + n]
            assert scale == pytest.approx(float(delta.abs().max()) / 127, rel=1e-6)
            error = got["w"].reshape(-1)[start : start + n] - update["w"].reshape(-1)[start : start + n]
            assert float(error.abs().max()) <= scale / 2 * 1.001
    # One byte per floating-point element, a 4-byte scale for each of their chunks (w: 3, b: 1, half: 1), the int64 raw.
    assert reader.wire_bytes == (1200 + 30 + 9) + 4 * 5 + 8
    assert reader.digest.startswith("blake2b:") and len(reader.digest) == len("blake2b:") + 128


def test_error_feedback_carries_what_quantisation_dropped_into_the_next_update():
    """One large coordinate sets the scale; the small ones are below half a step and round to zero every time.
    Without feedback they never move; with it, their sum over rounds follows the true sum within one step."""
    base = {"w": torch.zeros(10)}
    step = torch.full((10,), 0.002)
    step[0] = 1.0
    scale = 1.0 / 127
    sums = {}
    for feedback in (False, True):
        residual = [torch.zeros(10)] if feedback else None
        sent = torch.zeros(10)
        for _ in range(20):
            payload = serde.WeightsPayload({"w": base["w"] + step}, round=1, architecture=ARCH)
            got, _ = _receive(
                payload.chunks(1 << 20, INT8, base=_flat(base), residual=residual), payload.manifest, base=_flat(base)
            )
            sent += got["w"] - base["w"]
        sums[feedback] = sent
    assert torch.equal(sums[False][1:], torch.zeros(9))
    assert torch.allclose(sums[True][1:], torch.full((9,), 20 * 0.002), atol=scale)


def test_an_update_equal_to_its_base_and_one_with_nan_arrive_as_they_are():
    base = {"w": torch.ones(5)}
    got, _ = _receive(
        serde.WeightsPayload(base, round=1, architecture=ARCH).chunks(64, INT8, base=_flat(base)),
        [serde.manifest_of(base)[0]],
        base=_flat(base),
    )
    assert torch.equal(got["w"], base["w"])
    poisoned = {"w": torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])}
    with pytest.raises(serde.NonFiniteWeights):
        _receive(
            serde.WeightsPayload(poisoned, round=1, architecture=ARCH).chunks(64, INT8, base=_flat(base)),
            serde.manifest_of(base),
            base=_flat(base),
        )


def _stream(encoding=FP16, trailer="sha256") -> tuple[list[pb.WeightsChunk], serde.WeightsPayload]:
    payload = serde.WeightsPayload(_state(), round=1, architecture=ARCH)
    return list(payload.chunks(256, encoding, trailer=trailer)), payload


def _refused(chunks, manifest, error=serde.MalformedStream, **kw) -> str:
    with pytest.raises(error) as caught:
        _receive(chunks, manifest, **kw)
    return str(caught.value)


def test_bad_lossy_streams_are_refused_with_the_reason():
    chunks, payload = _stream()
    manifest = payload.manifest
    assert "without the trailer" in _refused(chunks[:-1], manifest)
    assert "must come last" in _refused([chunks[0], chunks[-1], *chunks[1:-1]], manifest)
    wrong = pb.WeightsChunk(trailer=pb.WeightsTrailer(digest="sha256:" + "0" * 64))
    assert "does not match" in _refused([*chunks[:-1], wrong], manifest, serde.DigestMismatch)
    assert "not the sha256 digest" in _refused(
        [*chunks[:-1], pb.WeightsChunk(trailer=pb.WeightsTrailer(digest="blake2b:00"))], manifest
    )
    assert "not accepted here" in _refused(chunks, manifest, encodings=(pb.CHUNK_ENCODING_RAW,))
    # Two chunks' elements in one: it runs past the end of its tensor.
    first, second = chunks[1].data, chunks[2].data
    merged = pb.WeightsChunk(data=pb.WeightsData(offset=0, data=first.data + second.data * 60))
    assert "does not fit" in _refused([chunks[0], merged, *chunks[3:]], manifest)


def test_int8_needs_a_base_on_the_receiving_side():
    base = _state(0)
    payload = serde.WeightsPayload(_state(1), round=1, architecture=ARCH)
    chunks = list(payload.chunks(256, INT8, base=_flat(base)))
    assert "lacks" in _refused(chunks, payload.manifest)
    with pytest.raises(ValueError, match="need the weights"):
        payload.chunks(256, INT8)


def test_a_raw_stream_with_its_digest_in_a_trailer_checks_out_with_every_digest():
    payload = serde.WeightsPayload(_state(), round=1, architecture=ARCH)
    raw = b"".join(bytes(v) for v in payload._views)
    expected = {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "blake2b": hashlib.blake2b(raw).hexdigest(),
        "xxh3_128": xxhash.xxh3_128_hexdigest(raw),
    }
    assert set(expected) == set(serde.DIGESTS)
    for name in serde.DIGESTS:
        chunks = list(payload.chunks(100, trailer=name))
        assert chunks[0].header.digest == f"{name}:"
        assert chunks[-1].trailer.digest == f"{name}:{expected[name]}"
        got, reader = _receive(chunks, payload.manifest)
        assert all(torch.equal(got[k], v) for k, v in _state().items()) and reader.wire_bytes == payload.total_bytes
        assert reader.hashes_fast == (name == "xxh3_128")
    assert "trailer in a stream whose header" in _refused([*payload.chunks(100), chunks[-1]], payload.manifest)


def test_the_fastest_digest_is_chosen_among_those_the_other_side_accepts():
    ranking = serde.digests_by_speed()
    assert sorted(ranking) == sorted(serde.DIGESTS)
    assert serde.fastest_digest() == ranking[0]
    assert serde.fastest_digest(serde.DIGESTS_BEFORE_1_6) == [d for d in ranking if d != "xxh3_128"][0]
    assert serde.fastest_digest(["md5", "blake2b"]) == "blake2b"
    assert serde.fastest_digest(["md5"]) is None


def test_piece_sizes_match_what_is_sent():
    payload = serde.WeightsPayload(_state(), round=1, architecture=ARCH)
    for encoding in (pb.CHUNK_ENCODING_RAW, FP16, INT8):
        chunks = payload.chunks(300, encoding, base=_flat(_state()) if encoding == INT8 else None)
        reader = serde.StreamReader(
            architecture=ARCH, expected=payload.manifest, encodings=(encoding,), base=_flat(_state())
        )
        sizes = [len(raw) for raw in map(reader.accept, chunks) if raw is not None]
        assert sizes == list(serde.piece_sizes(payload.manifest, 300, encoding))
