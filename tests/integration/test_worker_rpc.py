"""A live worker over real gRPC: right status codes for bad input, and weights that change only all at once."""

from __future__ import annotations

import hashlib
import signal
import threading

import grpc
import pytest
import torch
from xxhash import xxh3_128_hexdigest

from coordinator_service.local import LocalWorker
from fedpi.data import load_dataset
from fedpi.models import build_model, evaluate
from fedpi.net.protocol import PROTOCOL_VERSION
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.integration.conftest import DIGITS, METADATA, start_cluster

ARCH = "reference-cnn"


def _digest(stub) -> tuple[str, int]:
    header = next(iter(stub.GetWeights(pb.GetWeightsRequest(), metadata=METADATA, timeout=30))).header
    return header.digest, header.round


def _payload(round_: int = 1, seed: int = 1, arch: str = ARCH, **overrides) -> serde.WeightsPayload:
    state = build_model(ARCH, seed=seed).state_dict()
    state.update(overrides)
    return serde.WeightsPayload(state, round=round_, architecture=arch)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_get_info_describes_the_worker(worker):
    _, stub = worker
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert (info.worker_id, info.protocol_version, info.model_architecture) == ("solo", PROTOCOL_VERSION, ARCH)
    assert info.parameter_count == 431_080 and info.train_samples == 4000 and info.test_samples == 1000
    assert info.dataset == "digits-5k" and info.state == pb.WORKER_STATE_IDLE
    assert pb.CHUNK_ENCODING_RAW in info.chunk_encodings and info.cpu_architecture


def test_protocol_version_mismatch_is_failed_precondition(worker):
    _, stub = worker
    code, details = _code(
        lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=(("fedpi-protocol-version", "2.0"),), timeout=10)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "2.0" in details and PROTOCOL_VERSION in details and "upgrade" in details


def test_weights_round_trip_through_the_worker(worker):
    _, stub = worker
    payload = _payload(round_=4, seed=4)
    reply = stub.SetWeights(payload.chunks(100_000), metadata=METADATA, timeout=30)
    assert reply.bytes_received == payload.total_bytes
    assert _digest(stub) == (payload.digest, 4)


@pytest.mark.parametrize(
    "make_chunks, expected_code",
    [
        (lambda: _payload(arch="large-mlp").chunks(), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: _payload(**{"fc2.bias": torch.zeros(11)}).chunks(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: _payload(**{"fc2.bias": torch.zeros(10, dtype=torch.float64)}).chunks(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: _payload(**{"fc2.bias": torch.full((10,), float("nan"))}).chunks(), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: list(_payload().chunks())[:-1], grpc.StatusCode.INVALID_ARGUMENT),  # ends early
        (lambda: list(_payload().chunks())[1:], grpc.StatusCode.INVALID_ARGUMENT),  # no header
        (lambda: _corrupted(_payload()), grpc.StatusCode.DATA_LOSS),
        (lambda: _payload().chunks(1_500_000), grpc.StatusCode.RESOURCE_EXHAUSTED),  # worker takes 1 MiB chunks
    ],
    ids=["architecture", "shape", "dtype", "nan", "truncated", "headerless", "corrupted", "chunk-too-large"],
)
def test_bad_weight_streams_are_refused_and_change_nothing(worker, make_chunks, expected_code):
    # Prepare
    _, stub = worker
    before = _digest(stub)
    # Execute
    code, details = _code(lambda: stub.SetWeights(iter(make_chunks()), metadata=METADATA, timeout=30))
    # Assert
    assert code == expected_code, details
    assert details
    assert _digest(stub) == before


def _corrupted(payload: serde.WeightsPayload) -> list[pb.WeightsChunk]:
    chunks = list(payload.chunks())
    data = bytearray(chunks[1].data.data)
    data[100] ^= 0x01
    chunks[1].data.data = bytes(data)
    return chunks


def test_stream_cut_halfway_leaves_previous_weights(worker):
    """The coordinator vanishes mid-upload: the worker keeps its previous weights whole."""
    # Prepare
    _, stub = worker
    before = _digest(stub)
    chunks = list(_payload(seed=9).chunks(64 * 1024))
    half_sent, release = threading.Event(), threading.Event()

    def stream():
        for i, chunk in enumerate(chunks):
            if i == len(chunks) // 2:
                half_sent.set()
                release.wait(30)
                return
            yield chunk

    # Execute
    future = stub.SetWeights.future(stream(), metadata=METADATA, timeout=30)
    assert half_sent.wait(30)
    future.cancel()
    release.set()
    # Assert
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert _digest(stub) == before
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert info.state == pb.WORKER_STATE_IDLE


def test_train_for_a_round_whose_weights_are_not_installed_is_refused(worker):
    _, stub = worker
    _, current_round = _digest(stub)
    request = pb.TrainRequest(round=current_round + 7, local_batches=1, batch_size=8, learning_rate=0.01)
    code, details = _code(lambda: list(stub.Train(request, metadata=METADATA, timeout=30)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "call SetWeights" in details


def test_train_with_bad_config_is_invalid_argument(worker):
    _, stub = worker
    _, current_round = _digest(stub)
    request = pb.TrainRequest(round=current_round, local_batches=1, batch_size=0, learning_rate=0.01)
    code, details = _code(lambda: list(stub.Train(request, metadata=METADATA, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch_size" in details


def test_train_streams_a_result(worker):
    _, stub = worker
    _, current_round = _digest(stub)
    request = pb.TrainRequest(round=current_round, local_batches=3, batch_size=16, learning_rate=0.01, evaluate=True)
    updates = list(stub.Train(request, metadata=METADATA, timeout=60))
    result = updates[-1].result
    assert result.samples == 48 and result.batches == 3 and result.test_samples == 1000
    assert updates[-1].HasField("result") and all(u.HasField("progress") for u in updates[:-1])


def test_get_weights_with_bad_chunk_size_is_invalid_argument(worker):
    _, stub = worker
    code, details = _code(
        lambda: list(stub.GetWeights(pb.GetWeightsRequest(chunk_size=1 << 30), metadata=METADATA, timeout=10))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in details


def test_second_concurrent_upload_is_aborted_and_the_first_lands_whole(worker):
    """Two coordinators pushing weights at once are never interleaved: the second gets ABORTED."""
    # Prepare: a first upload that pauses half-way.
    _, stub = worker
    first = _payload(round_=5, seed=21)
    chunks = list(first.chunks(64 * 1024))
    half_sent, release = threading.Event(), threading.Event()

    def slow_stream():
        for i, chunk in enumerate(chunks):
            if i == len(chunks) // 2:
                half_sent.set()
                release.wait(30)
            yield chunk

    future = stub.SetWeights.future(slow_stream(), metadata=METADATA, timeout=60)
    assert half_sent.wait(30)
    # Execute
    code, details = _code(lambda: stub.SetWeights(_payload(round_=6, seed=22).chunks(), metadata=METADATA, timeout=30))
    release.set()
    # Assert
    assert code == grpc.StatusCode.ABORTED and "another SetWeights" in details
    assert future.result(60).bytes_received == first.total_bytes
    assert _digest(stub) == (first.digest, 5)


def test_sigterm_lets_a_running_train_finish_then_stops(tmp_path):
    """Graceful shutdown: a replaced pod does not cut a round in half, and exits by itself within its grace."""
    worker = LocalWorker("leaving", [*DIGITS, "--train-delay", "0.2", "--grace", "20"], tmp_path)
    cluster = start_cluster([worker])
    try:
        with grpc.insecure_channel(worker.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            updates = stub.Train(
                pb.TrainRequest(round=0, local_batches=10, batch_size=32, learning_rate=0.01),
                metadata=METADATA,
                timeout=60,
            )
            first = next(updates)  # training is under way
            worker.process.send_signal(signal.SIGTERM)
            rest = list(updates)
        assert first.HasField("progress") or first.HasField("result")
        assert rest and rest[-1].HasField("result") and rest[-1].result.batches == 10
        assert worker.process.wait(30) == 0
        assert '"worker_stopped"' in worker.log_path.read_text()
    finally:
        cluster.stop()


def test_train_with_a_time_budget_reports_the_batches_it_trained(worker):
    _, stub = worker
    _, current_round = _digest(stub)
    request = pb.TrainRequest(round=current_round, local_seconds=1.0, batch_size=16, learning_rate=0.01)
    result = list(stub.Train(request, metadata=METADATA, timeout=60))[-1].result
    assert result.batches >= 1 and result.samples == 16 * result.batches and result.train_seconds >= 1.0


def test_evaluate_reports_the_installed_weights_and_checks_the_round_id(worker):
    _, stub = worker
    payload = serde.WeightsPayload(
        build_model(ARCH, seed=5).state_dict(), round=3, architecture=ARCH, round_id="run/3.1/eval"
    )
    stub.SetWeights(payload.chunks(1 << 20), metadata=METADATA, timeout=30)
    result = stub.Evaluate(pb.EvaluateRequest(round_id="run/3.1/eval"), metadata=METADATA, timeout=60)
    assert result.round == 3 and result.round_id == "run/3.1/eval" and result.samples == 1000
    # The solo worker holds the whole digits-5k test split: the same figures computed here.
    loss, accuracy = evaluate(build_model(ARCH, seed=5), load_dataset("digits-5k", "unused", download=False).test)
    assert result.accuracy == pytest.approx(accuracy) and result.loss == pytest.approx(loss, rel=1e-5)
    assert _digest(stub)[0] == payload.digest  # evaluating changed nothing
    code, details = _code(lambda: stub.Evaluate(pb.EvaluateRequest(round_id="run/2.1"), metadata=METADATA, timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "call SetWeights" in details


def _weights(stub, **request) -> list[pb.WeightsChunk]:
    return list(stub.GetWeights(pb.GetWeightsRequest(**request), metadata=METADATA, timeout=30))


def test_get_weights_can_send_its_digest_in_a_trailer_computed_while_sending(worker):
    _, stub = worker
    payload = _payload(round_=6, seed=6)
    stub.SetWeights(payload.chunks(1 << 20, trailer="blake2b"), metadata=METADATA, timeout=30)  # a trailer upstream
    chunks = _weights(stub, chunk_size=100_000, digest_in_trailer=True)
    algorithm = chunks[0].header.digest
    assert algorithm in ("sha256:", "blake2b:") and chunks[-1].HasField("trailer")
    raw = b"".join(c.data.data for c in chunks[1:-1])
    assert chunks[-1].trailer.digest == algorithm + hashlib.new(algorithm[:-1], raw).hexdigest()
    assert _digest(stub) == (payload.digest, 6)  # without the flag: the sha256 digest in the header, as before


def test_digests_are_negotiated_the_worker_lists_its_own_and_picks_among_those_asked_for(worker):
    _, stub = worker
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert sorted(info.digests) == sorted(serde.DIGESTS)
    payload = _payload(round_=8, seed=8)
    raw = b"".join(bytes(v) for v in payload._views)
    stub.SetWeights(payload.chunks(1 << 20, trailer="xxh3_128"), metadata=METADATA, timeout=30)
    chunks = _weights(stub, chunk_size=100_000, digest_in_trailer=True, digests=["md5", "xxh3_128"])
    assert chunks[0].header.digest == "xxh3_128:" and chunks[-1].trailer.digest == f"xxh3_128:{xxh3_128_hexdigest(raw)}"
    assert chunks[-1].trailer.digest == f"xxh3_128:{xxh3_128_hexdigest(b''.join(c.data.data for c in chunks[1:-1]))}"
    assert _weights(stub, digest_in_trailer=True, digests=["sha256"])[0].header.digest == "sha256:"
    code, details = _code(lambda: _weights(stub, digest_in_trailer=True, digests=["md5"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "md5" in details and "xxh3_128" in details


def test_an_upload_with_a_wrong_checksum_in_its_trailer_is_data_loss_and_changes_nothing(worker):
    _, stub = worker
    kept = _payload(round_=9, seed=9)
    stub.SetWeights(kept.chunks(), metadata=METADATA, timeout=30)
    chunks = list(_payload(round_=10, seed=10).chunks(1 << 20, trailer="xxh3_128"))
    chunks[-1] = pb.WeightsChunk(trailer=pb.WeightsTrailer(digest="xxh3_128:" + "0" * 32))
    code, details = _code(lambda: stub.SetWeights(iter(chunks), metadata=METADATA, timeout=30))
    assert code == grpc.StatusCode.DATA_LOSS and "xxh3_128" in details
    assert _digest(stub) == (kept.digest, 9)


def test_int8_updates_need_a_train_that_asked_for_them_and_are_quantised_once(worker):
    _, stub = worker
    payload = _payload(round_=7, seed=7)
    stub.SetWeights(payload.chunks(), metadata=METADATA, timeout=30)
    int8 = dict(chunk_size=65536, encoding=pb.CHUNK_ENCODING_INT8_DELTA)
    code, details = _code(lambda: _weights(stub, **int8))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "update_encoding" in details
    list(
        stub.Train(
            pb.TrainRequest(
                round=7,
                local_batches=2,
                batch_size=16,
                learning_rate=0.05,
                update_encoding=pb.CHUNK_ENCODING_INT8_DELTA,
            ),
            metadata=METADATA,
            timeout=60,
        )
    )
    first, again = _weights(stub, **int8), _weights(stub, **int8)
    assert first == again  # the residual moved on once; a second fetch (clipping) gets the same bytes
    wire = sum(len(c.data.data) for c in first if c.HasField("data"))
    assert wire < payload.total_bytes / 3.9
    base = [t.reshape(-1) for t in build_model(ARCH, seed=7).state_dict().values()]
    reader = serde.StreamReader(architecture=ARCH, expected=payload.manifest, encodings=(int8["encoding"],), base=base)
    update = serde.read_state_dict(reader, iter(first))
    raw = serde.read_state_dict(serde.StreamReader(architecture=ARCH, expected=payload.manifest), iter(_weights(stub)))
    for name, t in raw.items():  # within half a quantisation step of the trained weights
        assert (
            float((update[name] - t).abs().max())
            <= float((t.reshape(-1) - base[list(raw).index(name)]).abs().max()) / 127 / 2 * 1.01 + 1e-7
        ), name
    code, details = _code(lambda: _weights(stub, chunk_size=32768, encoding=pb.CHUNK_ENCODING_INT8_DELTA))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "chunk_size=65536" in details


def test_a_half_precision_global_model_is_installed_as_its_rounded_values(worker):
    """--compress-global-model: SetWeights in fp16 installs exactly float16-rounded weights; int8 is refused there."""
    _, stub = worker
    payload = _payload(round_=8, seed=8)
    reply = stub.SetWeights(payload.chunks(1 << 20, pb.CHUNK_ENCODING_FP16), metadata=METADATA, timeout=30)
    assert reply.bytes_received == payload.total_bytes
    installed = serde.read_state_dict(
        serde.StreamReader(architecture=ARCH, expected=payload.manifest), iter(_weights(stub))
    )
    for name, t in build_model(ARCH, seed=8).state_dict().items():
        assert torch.equal(installed[name], t.half().float()), name
    base = [t.reshape(-1) for t in build_model(ARCH, seed=1).state_dict().values()]
    code, details = _code(
        lambda: stub.SetWeights(
            payload.chunks(1 << 20, pb.CHUNK_ENCODING_INT8_DELTA, base=base), metadata=METADATA, timeout=30
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not accepted here" in details
