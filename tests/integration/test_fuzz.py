"""Property-based fuzzing of a live worker: malformed weight streams and requests never crash it, always get a clean
status code, and never change its weights."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpi.models import build_model
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from tests.integration.conftest import METADATA

CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

VALID = serde.WeightsPayload(build_model("reference-cnn", seed=11).state_dict(), round=1, architecture="reference-cnn")
VALID_CHUNKS = list(VALID.chunks(256 * 1024))


def _digest(stub) -> str:
    return next(iter(stub.GetWeights(pb.GetWeightsRequest(), metadata=METADATA, timeout=30))).header.digest


tensor_specs = st.builds(
    pb.TensorSpec,
    name=st.sampled_from(["conv1.weight", "fc2.bias", "x", ""]),
    dtype=st.sampled_from(["float32", "float64", "int64", "bool", "nonsense", ""]),
    shape=st.lists(st.integers(-2, 600), max_size=4),
    byte_length=st.integers(-8, 2_000_000),
)
headers = st.builds(
    pb.WeightsHeader,
    round=st.integers(-5, 10**12),
    model_architecture=st.sampled_from(["reference-cnn", "large-mlp", ""]),
    tensors=st.lists(tensor_specs, max_size=5),
    total_bytes=st.integers(-10, 1 << 40),
    digest=st.sampled_from([VALID.digest, "sha256:00", "md5:1", ""]),
    encoding=st.integers(0, 5),
)
datas = st.builds(pb.WeightsData, offset=st.integers(-1, 3_000_000), data=st.binary(max_size=4096))
chunks = st.one_of(
    st.builds(lambda h: pb.WeightsChunk(header=h), headers),
    st.builds(lambda d: pb.WeightsChunk(data=d), datas),
    st.just(pb.WeightsChunk()),
)


def _mutated_valid_stream(draw_index: int, byte: int, mode: str) -> list[pb.WeightsChunk]:
    """A real stream with one thing wrong: a dropped, duplicated or swapped chunk, or a changed byte."""
    out = [pb.WeightsChunk.FromString(c.SerializeToString()) for c in VALID_CHUNKS]
    i = 1 + draw_index % (len(out) - 1)
    if mode == "drop":
        del out[i]
    elif mode == "duplicate":
        out.insert(i, out[i])
    elif mode == "swap":
        j = 1 + (i % (len(out) - 1))
        out[i], out[j] = out[j], out[i]
        if i == j:
            del out[i]
    else:
        data = bytearray(out[i].data.data)
        data[byte % len(data)] ^= 0x5A
        out[i].data.data = bytes(data)
    return out


@pytest.fixture(scope="module")
def stub(worker):
    return worker[1]


@FUZZ
@given(stream=st.lists(chunks, max_size=6))
def test_random_chunk_streams_get_a_clean_status(stub, stream):
    before = _digest(stub)
    try:
        stub.SetWeights(iter(stream), metadata=METADATA, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in CLEAN_CODES, (err.code(), err.details())
        assert err.details()
    else:
        pytest.fail("a random stream was accepted")
    assert _digest(stub) == before


@FUZZ
@given(
    index=st.integers(0, 1000), byte=st.integers(0, 10**6), mode=st.sampled_from(["drop", "duplicate", "swap", "flip"])
)
def test_nearly_valid_streams_are_refused_whole(stub, index, byte, mode):
    before = _digest(stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.SetWeights(iter(_mutated_valid_stream(index, byte, mode)), metadata=METADATA, timeout=30)
    assert err.value.code() in CLEAN_CODES, (err.value.code(), err.value.details())
    assert _digest(stub) == before


@FUZZ
@given(
    request=st.builds(
        pb.TrainRequest,
        round=st.integers(-3, 3),
        local_batches=st.integers(-3, 3),
        local_epochs=st.integers(-1, 1),
        batch_size=st.integers(-5, 100_000),
        learning_rate=st.floats(allow_nan=True, allow_infinity=True),
        momentum=st.floats(allow_nan=True, allow_infinity=True),
        seed=st.integers(-10, 10),
        local_seconds=st.one_of(st.just(0.0), st.floats(-1, 0.3), st.floats(allow_nan=True, allow_infinity=True)),
    )
)
def test_random_train_requests_get_a_clean_status_or_train(stub, request):
    try:
        updates = list(stub.Train(request, metadata=METADATA, timeout=60))
    except grpc.RpcError as err:
        assert err.code() in CLEAN_CODES, (err.code(), err.details())
        return
    assert updates[-1].HasField("result") and updates[-1].result.batches > 0


@FUZZ
@given(request=st.builds(pb.GetWeightsRequest, chunk_size=st.integers(-10, 1 << 31), encoding=st.integers(-1, 9)))
def test_random_get_weights_requests_get_a_clean_status_or_weights(stub, request):
    try:
        header = next(iter(stub.GetWeights(request, metadata=METADATA, timeout=30))).header
    except grpc.RpcError as err:
        assert err.code() in CLEAN_CODES, (err.code(), err.details())
    else:
        assert header.model_architecture == "reference-cnn"


def test_worker_still_serves_after_fuzzing(stub):
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert info.state == pb.WORKER_STATE_IDLE
