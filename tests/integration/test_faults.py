"""Faults during training, with real processes on 127.0.0.1: workers killed, frozen, restarted; streams cut and
corrupted on the wire; the coordinator killed and resumed. Each test is bounded and stops what it started."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import grpc
import pytest
import torch

from coordinator_service.local import LocalWorker
from fedpi.weights import serde
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.integration.conftest import DIGITS, METADATA, start_cluster
from tests.integration.faults import CoordinatorRun, FaultyProxy

# A long scenario (workers killed, frozen and restarted, a coordinator killed and resumed: minutes of real rounds):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario

NAMES = ["alice", "bob", "charlie"]
# Slowed a little so that a round lasts long enough to hit it in the middle of Train.
WORKER_ARGS = [*DIGITS, "--train-delay", "0.1"]
TRAIN = [
    "--dataset",
    "digits-5k",
    "--local-batches",
    "20",
    "--lr",
    "0.05",
    "--momentum",
    "0.5",
    "--min-workers",
    "2",
    "--handshake-timeout",
    "3",
    "--rpc-timeout",
    "10",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("fault-workers")
    workers = [LocalWorker(n, [*WORKER_ARGS, "--partition", f"{i}/3"], logs) for i, n in enumerate(NAMES)]
    cluster = start_cluster(workers)
    yield cluster
    cluster.stop()


@pytest.fixture
def workers(cluster):
    """All three workers running (restarting any a previous test killed), by name."""
    import asyncio

    for w in cluster.workers:
        if w.process.poll() is not None:
            w.start()
        else:
            os.kill(w.process.pid, signal.SIGCONT)
    asyncio.run(cluster.wait_serving(120))
    return {w.name: w for w in cluster.workers}


def _spec(workers: dict, **addresses: str) -> str:
    return ",".join(f"{n}={addresses.get(n, w.address)}" for n, w in workers.items())


def _workers_of(run: CoordinatorRun, round_: int) -> list[str]:
    [event] = [e for e in run.rounds() if e["round"] == round_]
    return sorted(event["workers"])


def _failures_of(run: CoordinatorRun, round_: int) -> dict[str, dict]:
    [event] = [e for e in run.rounds() if e["round"] == round_]
    return {f["worker"]: f for f in event["failures"]}


def test_worker_killed_mid_train_is_dropped_then_rejoins_after_restart(workers, tmp_path):
    # Prepare
    run = CoordinatorRun("train", "--workers", _spec(workers), "--rounds", "12", *TRAIN, "--output-dir", str(tmp_path))
    try:
        # Execute: kill -9 bob while round 2 trains; restart him once round 3 has begun.
        run.wait_for("round_started", round=2)
        run.wait_for("worker_train_finished", round=2)  # someone is done, so bob is mid-Train
        workers["bob"].kill()
        run.wait_for("round_started", round=3)
        workers["bob"].start()
        asyncio.run(workers["bob"].wait_serving(120))
        back = len(run.events)  # from here on, every round's handshake finds bob serving
        assert run.finish() == 0, "".join(run.lines[-40:])
    finally:
        run.proc.kill()
    # Assert
    assert _workers_of(run, 1) == ["alice", "bob", "charlie"]
    assert _workers_of(run, 2) == ["alice", "charlie"]
    assert _failures_of(run, 2)["bob"]["phase"] in ("train", "get_weights")
    # The round under way when bob came back may have begun without him; every round begun after it has him.
    later = [e["round"] for e in run.events[back:] if e.get("event") == "round_started"][1:]
    assert later, f"the run ended before bob could rejoin: {len(run.rounds())} rounds"
    assert all(_workers_of(run, r) == ["alice", "bob", "charlie"] for r in later), later
    assert [e["round"] for e in run.rounds()] == list(range(1, 13))


def test_worker_killed_mid_get_weights_leaves_the_average_clean(workers, tmp_path):
    # Bob's replies go through a proxy at 1 MB/s, so his 1.7 MB update takes ~2 s to stream: long enough to kill
    # him half-way, after part of it was folded into the running sum.
    with FaultyProxy(workers["bob"].port, rate=1_000_000) as proxy:
        run = CoordinatorRun(
            "train",
            "--workers",
            _spec(workers, bob=f"127.0.0.1:{proxy.port}"),
            "--rounds",
            "1",
            *TRAIN,
            "--output-dir",
            str(tmp_path),
        )
        try:
            run.wait_for("worker_train_finished", round=1, worker="bob")
            workers["bob"].kill()
            assert run.finish() == 0, "".join(run.lines[-40:])
        finally:
            run.proc.kill()
    assert _failures_of(run, 1)["bob"]["phase"] == "get_weights"
    assert _workers_of(run, 1) == ["alice", "charlie"]
    assert any(e.get("event") == "aggregation_restarted" for e in run.events)
    _assert_model_is_the_weighted_mean_of(run, tmp_path, workers, ["alice", "charlie"])


def _fetch_update(address: str) -> dict[str, torch.Tensor]:
    """A worker's weights as they are now: after a one-round run, its trained update of round 1."""
    with grpc.insecure_channel(address) as channel:
        chunks = pb_grpc.WorkerStub(channel).GetWeights(pb.GetWeightsRequest(), metadata=METADATA, timeout=30)
        reader = serde.StreamReader(architecture="reference-cnn", expected=None)
        state = serde.read_state_dict(reader, iter(chunks))
    assert (reader.header.round, reader.header.trained) == (1, True)
    return state


def _assert_model_is_the_weighted_mean_of(run: CoordinatorRun, out, workers: dict, good: list[str]) -> None:
    """model.pt after round 1 equals, to float tolerance, the sample-weighted mean of the good workers' updates,
    fetched from them after the run: nothing of anyone else's is in it."""
    [event] = run.rounds()
    samples = {n: event["workers"][n]["samples"] for n in good}
    updates = {n: _fetch_update(workers[n].address) for n in good}
    model = torch.load(out / "model.pt", weights_only=True)
    total = sum(samples.values())
    for name, tensor in model.items():
        expected = sum(updates[n][name].double() * samples[n] for n in good) / total
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(tensor, expected.round().to(tensor.dtype)), name


def test_frozen_worker_is_dropped_at_the_round_timeout_and_rejoins_when_thawed(workers, tmp_path):
    run = CoordinatorRun(
        "train",
        "--workers",
        _spec(workers),
        "--rounds",
        "4",
        *TRAIN,
        "--round-timeout",
        "8",
        "--output-dir",
        str(tmp_path),
    )
    try:
        run.wait_for("round_started", round=2)
        os.kill(workers["charlie"].process.pid, signal.SIGSTOP)
        run.wait_for("round_finished", round=2, timeout=60)
        os.kill(workers["charlie"].process.pid, signal.SIGCONT)
        assert run.finish() == 0, "".join(run.lines[-40:])
    finally:
        os.kill(workers["charlie"].process.pid, signal.SIGCONT)
        run.proc.kill()
    failure = _failures_of(run, 2)["charlie"]
    assert "round timeout of 8 s" in failure["reason"]
    assert "charlie" in _workers_of(run, 4)


def test_stream_cut_on_the_wire_drops_the_worker_for_that_round_only(workers, tmp_path):
    # 900 kB into bob's replies is inside his first GetWeights stream (the earlier replies are a few kB).
    with FaultyProxy(workers["bob"].port, cut_after=900_000) as proxy:
        run = CoordinatorRun(
            "train",
            "--workers",
            _spec(workers, bob=f"127.0.0.1:{proxy.port}"),
            "--rounds",
            "3",
            *TRAIN,
            "--output-dir",
            str(tmp_path),
        )
        try:
            assert run.finish() == 0, "".join(run.lines[-40:])
        finally:
            run.proc.kill()
        assert proxy.fired == ["cut"]
    assert _failures_of(run, 1)["bob"]["phase"] == "get_weights"
    assert _workers_of(run, 1) == ["alice", "charlie"]
    assert _workers_of(run, 3) == ["alice", "bob", "charlie"]


def test_flipped_byte_on_the_wire_never_reaches_the_global_model(workers, tmp_path):
    with FaultyProxy(workers["bob"].port, flip_at=1_200_000) as proxy:
        run = CoordinatorRun(
            "train",
            "--workers",
            _spec(workers, bob=f"127.0.0.1:{proxy.port}"),
            "--rounds",
            "1",
            *TRAIN,
            "--output-dir",
            str(tmp_path),
        )
        try:
            assert run.finish() == 0, "".join(run.lines[-40:])
        finally:
            run.proc.kill()
        assert proxy.fired == ["flip"]
    failure = _failures_of(run, 1)["bob"]
    # Most flips land in tensor bytes: the digest catches them at the end, or, if the flip made a value absurd, the
    # update bound catches it first; one in a frame header breaks the connection instead.
    assert failure["phase"] == "get_weights"
    assert any(
        s in failure["reason"] for s in ("DATA_LOSS", "digest", "lies more than", "NaN", "UNAVAILABLE", "INTERNAL")
    ), failure
    assert _workers_of(run, 1) == ["alice", "charlie"]
    _assert_model_is_the_weighted_mean_of(run, tmp_path, workers, ["alice", "charlie"])


def test_killed_coordinator_resumes_from_the_last_completed_round(workers, tmp_path):
    run = CoordinatorRun("train", "--workers", _spec(workers), "--rounds", "4", *TRAIN, "--output-dir", str(tmp_path))
    try:
        run.wait_for("round_finished", round=2)
        run.wait_for("round_started", round=3)
        run.kill()  # SIGKILL in the middle of round 3
    finally:
        run.proc.kill()
    before = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert before == [1, 2]
    checkpointed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state_dict"]

    # The model sent out in the first resumed round is the checkpoint's, byte for byte.
    expected = serde.WeightsPayload(checkpointed, round=3, architecture="reference-cnn").digest
    resumed = CoordinatorRun(
        "train", "--workers", _spec(workers), "--rounds", "3", *TRAIN, "--resume", "--output-dir", str(tmp_path)
    )
    try:
        assert resumed.finish() == 0, "".join(resumed.lines[-40:])
    finally:
        resumed.proc.kill()
    assert resumed.wait_for("training_resumed")["from_round"] == 2
    assert resumed.wait_for("round_started", round=3)["model_digest"] == expected

    final = CoordinatorRun(
        "train", "--workers", _spec(workers), "--rounds", "4", *TRAIN, "--resume", "--output-dir", str(tmp_path)
    )
    try:
        assert final.finish() == 0, "".join(final.lines[-40:])
    finally:
        final.proc.kill()
    assert [e["round"] for e in final.rounds()] == [4]
    after = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in after] == [1, 2, 3, 4]
    assert after[-1]["test_accuracy"] > after[0]["test_accuracy"]


def test_train_longer_than_the_keepalive_interval_completes(tmp_path):
    # A worker that reports no progress for the whole ~6 s Train (a long batch on a slow Pi) while the coordinator
    # pings every second: the worker must accept the pings on a quiet stream rather than answer GOAWAY ("too many
    # pings"), and the quiet stream must not be taken for a dead one.
    quiet = LocalWorker("quiet", [*DIGITS, "--train-delay", "0.1", "--progress-interval", "60"], tmp_path)
    cluster = start_cluster([quiet])
    run = CoordinatorRun(
        "train",
        "--workers",
        f"quiet={quiet.address}",
        "--rounds",
        "1",
        *TRAIN,
        "--min-workers",
        "1",
        "--round-retries",
        "0",
        "--local-batches",
        "60",
        "--keepalive",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    )
    try:
        assert run.finish() == 0, "".join(run.lines[-40:])
    finally:
        run.proc.kill()
        cluster.stop()
    [event] = run.rounds()
    assert event["failures"] == [] and event["workers"]["quiet"]["train_seconds"] > 5


def test_round_below_quorum_is_retried_with_the_worker_that_came_back(workers, tmp_path):
    run = CoordinatorRun(
        "train",
        "--workers",
        _spec(workers),
        "--rounds",
        "2",
        *TRAIN,
        "--min-workers",
        "3",
        "--round-retries",
        "2",
        "--retry-backoff",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    try:
        run.wait_for("worker_train_finished", round=1)
        workers["charlie"].kill()
        run.wait_for("round_retrying", round=1)
        workers["charlie"].start()
        assert run.finish() == 0, "".join(run.lines[-40:])
    finally:
        run.proc.kill()
    assert [e["round"] for e in run.rounds()] == [1, 2]
    assert _workers_of(run, 1) == ["alice", "bob", "charlie"]


def test_round_below_quorum_stops_with_the_reasons_and_keeps_the_model(workers, tmp_path):
    run = CoordinatorRun(
        "train",
        "--workers",
        _spec(workers),
        "--rounds",
        "2",
        *TRAIN,
        "--min-workers",
        "3",
        "--round-retries",
        "1",
        "--retry-backoff",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    try:
        run.wait_for("worker_train_finished", round=1)
        workers["charlie"].kill()
        assert run.finish() == 1
    finally:
        run.proc.kill()
    failed = run.wait_for("training_failed", timeout=1)
    assert "below the quorum" in failed["reason"] and "the global model is unchanged" in failed["reason"]
    assert run.rounds() == []
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "model.pt").exists()
