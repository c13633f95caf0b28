"""What an operator reads about a run through `fedpi serve`: every worker the run was told about, with why it did not
train; expected failures without tracebacks; `fedpi runs list|get -o json|yaml` parsing back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from coordinator_service.local import LocalWorker
from coordinator_service.observe.report import write_report
from generated.fedpi.v1 import coordinator_pb2 as cpb
from tests.conftest import ROOT
from tests.integration.conftest import start_cluster
from tests.integration.test_service import SETTINGS, Server, stub, watch


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """A worker training another task: refused at every handshake."""
    cluster = start_cluster(
        [
            LocalWorker(
                "dave", ["--task", "tests.tiny_task:TinyTask", "--threads", "1"], tmp_path_factory.mktemp("stranger")
            )
        ]
    )
    yield cluster.workers[0]
    cluster.stop()


def fedpi(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpi_cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_refused_worker_is_in_the_record_the_listing_and_the_report_with_its_reason(
    tmp_path, digits_cluster, stranger
):
    srv = Server(tmp_path / "state").start()
    try:
        api = stub(srv.address)
        workers = [*digits_cluster.spec.split(","), f"dave={stranger.address}"]
        api.StartRun(cpb.RunSpec(run_id="four", rounds=2, workers=workers, settings=SETTINGS), timeout=30)
        events = watch(api, "four")
        assert not [e for e in events if e["event"] == "run_crashed"]
        run = api.GetRun(cpb.GetRunRequest(run_id="four"), timeout=10)
        assert run.state == cpb.RUN_STATE_FINISHED
        dave = next(w for w in run.workers if w.name == "dave")
        assert dave.state == "refused" and "task" in dave.reason
        assert sorted(w.name for w in run.workers if w.state == "trained") == ["alice", "bob", "charlie"]
        assert [(f.round, f.worker, f.phase) for f in run.failures] == [(1, "dave", "refused"), (2, "dave", "refused")]
        listed = fedpi("runs", "list", "--coordinator", srv.address)
        assert listed.returncode == 0 and "3/4 1 refused" in listed.stdout, listed.stdout + listed.stderr
        as_json = json.loads(fedpi("runs", "list", "--coordinator", srv.address, "-o", "json").stdout)
        assert as_json[0]["run_id"] == "four" and as_json[0]["state"] == "finished"
        assert as_json[0]["started_at"].endswith("Z") and "T" in as_json[0]["started_at"]  # a date, not a float
        got = yaml.safe_load(fedpi("runs", "get", "four", "-o", "yaml", "--coordinator", srv.address).stdout)
        assert {w["name"]: w["state"] for w in got["workers"]}["dave"] == "refused"
        assert got["settings"]["training"]["local_batches"] == 10 and got["last_round"]["round"] == 2
        page = write_report(srv.state_dir / "runs" / "four").read_text()
        assert "<td>dave</td><td>refused</td><td>1-2</td>" in page and "workers that took no part" in page
    finally:
        srv.stop()


def test_a_run_that_misses_its_handshake_quorum_fails_without_a_traceback(tmp_path):
    srv = Server(tmp_path / "state").start()
    try:
        api = stub(srv.address)
        api.StartRun(
            cpb.RunSpec(
                run_id="nobody", workers=["a=127.0.0.1:1", "b=127.0.0.1:2"], timeouts=cpb.Timeouts(handshake_timeout=1)
            ),
            timeout=30,
        )
        events = watch(api, "nobody")
        run = api.GetRun(cpb.GetRunRequest(run_id="nobody"), timeout=10)
        assert run.state == cpb.RUN_STATE_FAILED and "passed the handshake" in run.error
        assert not [e for e in events if e["event"] == "run_crashed" or "exception" in e]
        assert {(w.name, w.state) for w in run.workers} == {("a", "unavailable"), ("b", "unavailable")}
    finally:
        srv.stop()
