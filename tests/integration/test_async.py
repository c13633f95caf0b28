"""`--mode async` with real worker processes on 127.0.0.1: one worker several times slower than the others keeps
no one waiting, its stale updates weigh as configured or are refused beyond --max-staleness, and a coordinator killed
mid-run resumes from its last checkpointed version. Each test is bounded and stops what it started."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator_service.local import LocalWorker
from tests.integration.conftest import DIGITS, events, run_coordinator, start_cluster
from tests.integration.faults import CoordinatorRun

# A long scenario (asynchronous runs with workers slowed, killed and restarted):
# `make test-scenarios` runs it, and CI after `make test`.
pytestmark = pytest.mark.scenario

# charlie takes 0.3 s a batch, alice and bob 0.02 s: charlie is several times slower, even on a busy machine.
DELAYS = {"alice": "0.02", "bob": "0.02", "charlie": "0.3"}
TRAIN = ["--dataset", "digits-5k", "--local-batches", "6", "--lr", "0.05", "--min-workers", "1"]
ASYNC = ["--mode", "async", "--buffer-size", "2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("async-workers")
    workers = [
        LocalWorker(name, [*DIGITS, "--partition", f"{i}/3", "--train-delay", delay], logs)
        for i, (name, delay) in enumerate(DELAYS.items())
    ]
    cluster = start_cluster(workers)
    yield cluster
    cluster.stop()


def _idle_in_sync(rounds: list[dict], worker: str) -> float:
    """The share of a synchronous run's round time a worker spent not training: it waits for the slowest."""
    wall = sum(r["wall_seconds"] for r in rounds)
    return 1 - sum(r["workers"][worker]["train_seconds"] for r in rounds) / wall


def test_a_slow_worker_keeps_no_one_waiting_and_its_stale_updates_weigh_less(cluster, tmp_path):
    sync = run_coordinator("train", "--workers", cluster.spec, "--rounds", "4", *TRAIN, "--output-dir",
                           str(tmp_path / "sync"))  # fmt: skip
    assert sync.returncode == 0, sync.stdout[-2000:]
    done = run_coordinator("train", "--workers", cluster.spec, "--rounds", "12", *TRAIN, *ASYNC, "--output-dir",
                           str(tmp_path / "async"))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]

    log = events(done.stdout)
    versions = [e for e in log if e.get("event") == "round_finished"]
    assert [e["version"] for e in versions] == list(range(1, 13))
    idle = next(e for e in log if e.get("event") == "workers_idle")["idle_fraction"]
    sync_rounds = [json.loads(line) for line in (tmp_path / "sync" / "metrics.jsonl").read_text().splitlines()]
    for fast in ("alice", "bob"):
        # In step, a fast worker waits for charlie most of each round; on its own it hardly waits.
        in_step = _idle_in_sync(sync_rounds, fast)
        assert in_step > 0.4 and idle[fast] < min(0.15, in_step / 3), (in_step, idle)

    buffered = [e for e in log if e.get("event") == "update_buffered"]
    assert {e["worker"] for e in buffered} == {"alice", "bob", "charlie"}
    assert max(e["staleness"] for e in buffered if e["worker"] == "charlie") >= 1
    for e in buffered:  # 6 batches of 64 digits, weighed by (1 + staleness)^-0.5
        assert e["weight"] == pytest.approx(384 * (1 + e["staleness"]) ** -0.5, abs=1e-3), e
    # Every version's report names its updates' staleness.
    assert all("staleness" in w for e in versions for w in e["workers"].values())


def test_updates_beyond_max_staleness_are_refused_and_their_worker_resynced(cluster, tmp_path):
    done = run_coordinator("train", "--workers", cluster.spec, "--rounds", "8", *TRAIN, *ASYNC, "--max-staleness",
                           "0", "--output-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    log = events(done.stdout)
    stale = [e for e in log if e.get("event") == "worker_dropped" and e.get("phase") == "stale"]
    assert "charlie" in {e["worker"] for e in stale}  # a fast worker that sent the first half of a buffer may be too
    assert "beyond --max-staleness 0" in stale[0]["reason"]
    assert all(e["staleness"] == 0 for e in log if e.get("event") == "update_buffered")
    failures = [f for e in log if e.get("event") == "round_finished" for f in e["failures"]]
    assert failures and {f["phase"] for f in failures} == {"stale"}


def test_a_killed_async_coordinator_resumes_from_its_last_checkpointed_version(cluster, tmp_path):
    args = ["train", "--workers", cluster.spec, "--rounds", "10", *TRAIN, *ASYNC, "--output-dir", str(tmp_path)]
    run = CoordinatorRun(*args)
    try:
        run.wait_for("round_finished", round=3)
        run.kill()
    finally:
        run.proc.kill()
    before = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert before == list(range(1, len(before) + 1)) and len(before) >= 3

    resumed = CoordinatorRun(*args, "--resume")
    try:
        assert resumed.finish() == 0, "".join(resumed.lines[-40:])
    finally:
        resumed.proc.kill()
    assert resumed.wait_for("training_resumed")["from_round"] == len(before)
    assert [e["version"] for e in resumed.rounds()] == list(range(len(before) + 1, 11))
    after = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in after] == list(range(1, 11))


def test_a_worker_killed_mid_run_is_dropped_the_run_goes_on_and_it_rejoins_once_restarted(cluster, tmp_path):
    alice = cluster.workers[0]
    run = CoordinatorRun("train", "--workers", cluster.spec, "--rounds", "40", *TRAIN, *ASYNC, "--retry-backoff",
                         "0.5", "--output-dir", str(tmp_path))  # fmt: skip
    try:
        run.wait_for("round_finished", round=3)
        alice.process.kill()
        alice.process.wait()
        run.wait_for("worker_dropped", worker="alice")
        gone = run.wait_for("round_finished", round=8)  # made by the others alone
        alice.start()
        asyncio.run(cluster.wait_serving(60))
        back = run.wait_for("worker_rejoined", worker="alice")
        assert run.finish() == 0, "".join(run.lines[-30:])
    finally:
        run.proc.kill()
        if alice.process.poll() is not None:
            alice.start()
    assert "alice" not in gone["workers"]
    later = [e for e in run.events if e.get("event") == "update_buffered" and e["worker"] == "alice"]
    assert any(e["trained_from"] >= back["version"] for e in later)
    assert [e["version"] for e in run.rounds()] == list(range(1, 41))
