"""A live worker cannot be overrun, hung or confused by its callers: bounded requests, deadlines on uploads,
cancellation that stops training before anything else touches the model, heartbeats that say they are heartbeats."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from coordinator_service.engine.worker_client import WorkerClient
from coordinator_service.engine.worker_errors import WorkerTimeout
from coordinator_service.local import LocalWorker
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.integration.conftest import DIGITS, METADATA, start_cluster
from tests.integration.test_worker_rpc import _code, _digest, _payload


@pytest.fixture(scope="module")
def slow_worker(tmp_path_factory):
    """Batches of at least 0.3 s, progress every 0.2 s, uploads that must show a header within 2 s."""
    cluster = start_cluster(
        [
            LocalWorker(
                "slow",
                [*DIGITS, "--train-delay", "0.3", "--progress-interval", "0.2", "--upload-grace", "2"],
                tmp_path_factory.mktemp("slow"),
            )
        ]
    )
    channel = grpc.insecure_channel(cluster.workers[0].address)
    yield cluster.workers[0], pb_grpc.WorkerStub(channel)
    channel.close()
    cluster.stop()


def _install(stub, round_: int, seed: int, round_id: str = ""):
    payload = _payload(round_=round_, seed=seed)
    payload.round_id = round_id
    stub.SetWeights(payload.chunks(), metadata=METADATA, timeout=30)
    return payload


def test_a_huge_training_request_is_refused_at_once_and_the_worker_stays_up(slow_worker):
    _, stub = slow_worker
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert info.max_local_batches == 100_000
    for request in (
        pb.TrainRequest(round=info.weights_round, local_batches=2**62, batch_size=64, learning_rate=0.01),
        pb.TrainRequest(round=info.weights_round, local_epochs=2**40, batch_size=1, learning_rate=0.01),
    ):
        started = time.monotonic()
        code, details = _code(lambda r=request: list(stub.Train(r, metadata=METADATA, timeout=30)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_local_batches" in details
        assert time.monotonic() - started < 5
    assert stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10).state == pb.WORKER_STATE_IDLE


def test_heartbeats_are_marked_and_progress_counts_batches(slow_worker):
    _, stub = slow_worker
    _install(stub, 3, 3, "run/3.1")
    request = pb.TrainRequest(round=3, round_id="run/3.1", local_batches=4, batch_size=16, learning_rate=0.01)
    updates = list(stub.Train(request, metadata=METADATA, timeout=60))
    progress = [u.progress for u in updates[:-1]]
    assert updates[-1].result.round_id == "run/3.1" and updates[-1].result.batches == 4
    beats = [p for p in progress if p.heartbeat]
    fresh = [p.batches_done for p in progress if not p.heartbeat]
    assert beats, "a 0.3 s batch with 0.2 s progress interval must produce heartbeats"
    assert fresh == sorted(set(fresh)) and fresh[-1] == 4


def test_the_coordinator_drops_a_worker_whose_batches_stop_while_heartbeats_go_on(tmp_path):
    """A training thread stuck in one batch (here: 60 s per batch) still sends heartbeats; --idle-timeout 3 must
    drop it after about 3 s, not wait for the round timeout."""
    worker = LocalWorker("stuck", [*DIGITS, "--train-delay", "60", "--progress-interval", "0.5"], tmp_path)
    cluster = start_cluster([worker])

    async def train() -> float:
        client = WorkerClient("stuck", worker.address, idle_timeout=3)
        started = time.monotonic()
        try:
            with pytest.raises(WorkerTimeout, match="no batch finished for 3 s"):
                await asyncio.wait_for(
                    client.train(pb.TrainRequest(round=0, local_batches=5, batch_size=8, learning_rate=0.01)), 30
                )
        finally:
            await client.close()
        return time.monotonic() - started

    try:
        assert asyncio.run(train()) < 10
    finally:
        cluster.stop()


def test_a_cancelled_train_stops_before_set_weights_can_install(slow_worker):
    """The caller cancels Train mid-stream and at once uploads new weights: they must land whole and stay so; the
    old training thread must not go on changing them, nor mark them untrainable afterwards."""
    _, stub = slow_worker
    _install(stub, 4, 4, "run/4.1")
    call = stub.Train(
        pb.TrainRequest(round=4, round_id="run/4.1", local_batches=200, batch_size=16, learning_rate=0.5),
        metadata=METADATA,
        timeout=60,
    )
    next(call)
    call.cancel()
    new = _payload(round_=5, seed=5)
    new.round_id = "run/5.1"
    deadline = time.monotonic() + 10
    while True:  # ABORTED while the old thread winds down; then it must install
        try:
            stub.SetWeights(new.chunks(), metadata=METADATA, timeout=30)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and time.monotonic() < deadline, exc.details()
            time.sleep(0.05)
    time.sleep(1.5)  # several batches' time for a thread that was not stopped
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert (info.weights_round, info.weights_round_id, info.weights_trained) == (5, "run/5.1", False)
    assert _digest(stub) == (new.digest, 5)


def test_set_weights_during_training_is_refused_before_the_upload_is_read(slow_worker):
    _, stub = slow_worker
    _install(stub, 6, 6)
    training = stub.Train(
        pb.TrainRequest(round=6, local_batches=10, batch_size=16, learning_rate=0.01), metadata=METADATA, timeout=60
    )
    next(training)
    release = threading.Event()
    chunks = list(_payload(round_=7, seed=7).chunks())

    def stalled():
        yield chunks[0]
        release.wait(20)  # the rest would only come after 20 s
        yield from chunks[1:]

    started = time.monotonic()
    code, details = _code(lambda: stub.SetWeights(stalled(), metadata=METADATA, timeout=30))
    release.set()
    assert code == grpc.StatusCode.ABORTED and "training round 6" in details
    assert time.monotonic() - started < 5
    list(training)


def test_an_idle_upload_times_out_and_frees_the_upload_slot(slow_worker):
    _, stub = slow_worker
    release = threading.Event()
    chunks = list(_payload(round_=8, seed=8).chunks())

    def idle():
        yield chunks[0]
        release.wait(20)

    started = time.monotonic()
    code, details = _code(lambda: stub.SetWeights(idle(), metadata=METADATA, timeout=30))
    release.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "nothing was installed" in details
    assert time.monotonic() - started < 15  # 2 s grace + 1.7 MB at 256 KiB/s
    _install(stub, 9, 9)  # the slot is free again
    assert _digest(stub)[1] == 9


def test_train_needs_the_round_id_of_the_installed_weights_and_trains_them_once(slow_worker):
    _, stub = slow_worker
    _install(stub, 10, 10, "run/10.1")
    other = pb.TrainRequest(round=10, round_id="other/10.1", local_batches=1, batch_size=8, learning_rate=0.01)
    code, details = _code(lambda: list(stub.Train(other, metadata=METADATA, timeout=30)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "run/10.1" in details
    ok = pb.TrainRequest(round=10, round_id="run/10.1", local_batches=1, batch_size=8, learning_rate=0.01)
    assert list(stub.Train(ok, metadata=METADATA, timeout=30))[-1].result.round_id == "run/10.1"
    header = next(iter(stub.GetWeights(pb.GetWeightsRequest(), metadata=METADATA, timeout=30))).header
    assert (header.round, header.round_id, header.trained) == (10, "run/10.1", True)
    code, details = _code(lambda: list(stub.Train(ok, metadata=METADATA, timeout=30)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already trained" in details
