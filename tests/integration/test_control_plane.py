"""`fedpi serve` tried as a hostile client on its LAN would: every hole of a service whose requests went through the
CLI's parser, each against a live server. A refusal must be INVALID_ARGUMENT or PERMISSION_DENIED naming the field,
nothing may be created or written, and the service must answer afterwards."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from coordinator_service.local import free_port
from fedpi.net import certs
from generated.fedpi.v1 import coordinator_pb2 as cpb
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.integration.test_service import SETTINGS, Server, stub, watch


class Listener:
    """A TCP port that counts the connections made to it: where a run must never go."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the refusals (none of which may create anything), beside a directory it must never touch."""
    root = tmp_path_factory.mktemp("refusals")
    (root / "outside").mkdir()
    (root / "outside" / "metrics.jsonl").write_text("someone else's\n")
    srv = Server(root / "state").start()
    yield srv
    srv.stop()


@pytest.fixture
def outside(server):
    return server.state_dir.parent / "outside"


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def refused(api, request: cpb.RunSpec) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        api.StartRun(request, timeout=30)
    return err.value


def test_settings_keys_that_argparse_would_expand_or_split_are_refused_and_write_nothing(
    server, digits_cluster, outside
):
    api = stub(server.address)
    workers = digits_cluster.spec.split(",")
    before = files(outside)
    hostile = [
        {"output": str(outside)},  # a prefix argparse expanded to --output-dir
        {"latest": str(outside / "metrics.jsonl")},  # ... to --latest-link: a symlink over another file
        {"lr=0.1 --output-dir": str(outside)},  # '=' inside the key
        {"lr": f"--output-dir={outside}"},  # a value that looks like an option
        {"local-batches": "5 --token-file /etc/hostname"},
        {"token": "/etc/hostname"},  # a prefix of --token-file
        {"tls-server": "evil"},
        {"--help": "true"},
    ]
    for settings in hostile:
        err = refused(api, cpb.RunSpec(rounds=1, workers=workers, settings=settings))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (settings, err.details())
        assert "usage:" not in err.details() and "Traceback" not in err.details()
    assert files(outside) == before
    assert not api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs
    assert [p.name for p in server.state_dir.iterdir()] == ["runs"] and not any((server.state_dir / "runs").iterdir())


@pytest.mark.parametrize(
    "spec, field",
    [
        (cpb.RunSpec(training=cpb.LocalTraining(lr=float("nan"))), "lr = nan"),
        (cpb.RunSpec(aggregation=cpb.AggregationSettings(max_update_ratio=float("nan"))), "max_update_ratio = nan"),
        (cpb.RunSpec(aggregation=cpb.AggregationSettings(max_update_ratio=float("inf"))), "max_update_ratio = inf"),
        (cpb.RunSpec(settings={"max-update-ratio": "nan"}), "max_update_ratio = 'nan'"),
        (cpb.RunSpec(rounds=-3), "rounds = -3"),
        (cpb.RunSpec(transfer=cpb.TransferSettings(chunk_size=0)), "chunk_size = 0"),
        (cpb.RunSpec(timeouts=cpb.Timeouts(round_retries=10**9)), "round_retries = 1000000000"),
        (cpb.RunSpec(training=cpb.LocalTraining(local_batches=-1)), "local_batches = -1"),
        (cpb.RunSpec(training=cpb.LocalTraining(lr_schedule="warmup")), "lr_schedule = 'warmup'"),
        (cpb.RunSpec(run_id="lab-1\n"), "run_id = 'lab-1\\n'"),
        (cpb.RunSpec(run_id="../escape"), "run_id = '../escape'"),
        (cpb.RunSpec(run_id="x" * 1_000_000), "run_id = 'xxxx"),
        (cpb.RunSpec(task="t" * 1_000_000), "task = 'tttt"),
        (cpb.RunSpec(dataset="d" * 100_000), "dataset = 'dddd"),
        (cpb.RunSpec(settings={f"k{i}": "v" * 10_000 for i in range(80)}), "settings holds 80 entries"),
        (
            cpb.RunSpec(transfer=cpb.TransferSettings(compression="int8", compress_global_model=True)),
            "compress_global_model goes with compression fp16 or bf16",
        ),
        (cpb.RunSpec(preset="fast"), "preset = 'fast'"),
        (cpb.RunSpec(model="resnet-9000"), "model = 'resnet-9000': the mnist task's models are reference-cnn"),
        (cpb.RunSpec(dataset="imagenet"), "dataset = 'imagenet': the mnist task's datasets are"),
    ],
)
def test_numbers_and_sizes_out_of_range_are_invalid_argument_naming_the_field(server, digits_cluster, spec, field):
    api = stub(server.address)
    if not spec.workers:
        spec.workers.extend(digits_cluster.spec.split(","))
    err = refused(api, spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details(), err.details()
    assert len(err.details()) < 2000
    assert not api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs


def test_oversized_requests_leave_listruns_working(server, digits_cluster):
    api = stub(server.address)
    huge = cpb.RunSpec(workers=[f"w{i}=127.0.0.1:{i + 1}" for i in range(300)], run_id="many")
    assert refused(api, huge).code() == grpc.StatusCode.INVALID_ARGUMENT
    too_big = cpb.RunSpec(run_id="big", settings={"lr": "1" * (2 << 20)})  # beyond the API's 1 MiB request bound
    assert refused(api, too_big).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []


def test_a_task_outside_the_allow_list_is_never_imported(tmp_path, digits_cluster):
    marker = tmp_path / "imported"
    srv = Server(tmp_path / "state", env={"FEDPI_TEST_MARKER": str(marker)}).start()
    try:
        api = stub(srv.address)
        err = refused(api, cpb.RunSpec(task="tests.exiting_task:Task", workers=digits_cluster.spec.split(",")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "is not allowed" in err.details()
        assert "mnist" in err.details()  # says what is allowed
        assert not marker.exists()  # its top-level code never ran
        assert api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
    finally:
        assert srv.stop() == 0  # alive until told to stop


def test_an_allowed_task_that_exits_on_import_does_not_take_the_service_down(tmp_path, digits_cluster):
    marker = tmp_path / "imported"
    srv = Server(
        tmp_path / "state", "--allow-task", "tests.exiting_task:Task", env={"FEDPI_TEST_MARKER": str(marker)}
    ).start()
    try:
        api = stub(srv.address)
        err = refused(api, cpb.RunSpec(task="tests.exiting_task:Task", workers=digits_cluster.spec.split(",")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "cannot be loaded: SystemExit while importing it" in err.details()
        assert marker.exists()  # it was imported (the operator allowed it), and the server survived
        assert api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
    finally:
        assert srv.stop() == 0


def test_importing_an_allowed_task_does_not_block_the_service(tmp_path):
    import time
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(tmp_path / "state", "--allow-task", "tests.slow_task:SlowTask").start()
    try:
        api = stub(srv.address)
        assert not api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs  # connected: StartRun below starts at once
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(
                api.StartRun,
                cpb.RunSpec(
                    task="tests.slow_task:SlowTask",
                    workers=["a=127.0.0.1:1"],
                    timeouts=cpb.Timeouts(handshake_timeout=1),
                ),
                timeout=30,
            )
            time.sleep(0.5)  # the import has begun, and sleeps 3 s
            began = time.monotonic()
            api.ListRuns(cpb.ListRunsRequest(), timeout=10)
            answered = time.monotonic() - began
            assert not start.done() and answered < 1.0, answered
            assert start.result().state == cpb.RUN_STATE_TRAINING
    finally:
        srv.stop()


def test_calls_beyond_max_concurrent_rpcs_are_refused_while_the_others_run(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(tmp_path / "state", "--allow-task", "tests.slow_task:SlowTask", "--max-concurrent-rpcs", "1").start()
    try:
        api = stub(srv.address)
        assert not api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs  # connected: StartRun below starts at once
        with ThreadPoolExecutor(1) as pool:
            start = pool.submit(
                api.StartRun,
                cpb.RunSpec(
                    task="tests.slow_task:SlowTask",
                    workers=["a=127.0.0.1:1"],
                    timeouts=cpb.Timeouts(handshake_timeout=1),
                ),
                timeout=30,
            )
            import time

            time.sleep(1.0)  # StartRun is importing the task (3 s): the one call the server takes at a time
            with pytest.raises(grpc.RpcError) as err:
                api.ListRuns(cpb.ListRunsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert start.result().state == cpb.RUN_STATE_TRAINING
        assert [r.run_id for r in api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs]  # answered once it is free
    finally:
        srv.stop()


def test_workers_outside_the_allow_list_are_refused_before_any_connection(tmp_path):
    listener = Listener("127.0.0.9")
    srv = Server(tmp_path / "state", "--allow-workers", "127.0.0.1").start()
    try:
        api = stub(srv.address)
        for spec in (
            cpb.RunSpec(workers=[f"evil={listener.address}"]),
            cpb.RunSpec(workers_dns=listener.address, expect_workers=1),
            cpb.RunSpec(workers=["a=127.0.0.1:1", f"b={listener.address}"]),
            cpb.RunSpec(workers=[f"a=localhost:{listener.address.split(':')[1]}"]),
        ):
            err = refused(api, spec)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "may not reach" in err.details()
        assert listener.accepted == 0
    finally:
        srv.stop()
        listener.close()


def test_the_workers_a_run_may_name_are_capped(tmp_path):
    srv = Server(tmp_path / "state", "--max-workers-per-run", "2").start()
    try:
        err = refused(stub(srv.address), cpb.RunSpec(workers=[f"w{i}=127.0.0.1:{i + 1}" for i in range(3)]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 2 per run" in err.details()
    finally:
        srv.stop()


def test_typed_fields_reach_the_workers_and_a_false_switches_off_what_the_server_switched_on(tmp_path, digits_cluster):
    srv = Server(tmp_path / "state", env={"FEDPI_FEDERATED_EVALUATION": "true", "FEDPI_LOCAL_BATCHES": "7"}).start()
    try:
        api = stub(srv.address)
        api.StartRun(
            cpb.RunSpec(
                run_id="typed",
                rounds=1,
                workers=digits_cluster.spec.split(","),
                training=cpb.LocalTraining(local_batches=4),
                evaluation=cpb.EvaluationSettings(federated_evaluation=False),
                timeouts=cpb.Timeouts(handshake_timeout=5, round_retries=0),
            ),
            timeout=30,
        )
        events = watch(api, "typed")
        progress = [e for e in events if e["event"] == "worker_progress" and not e["heartbeat"]]
        assert progress and {e["batches_total"] for e in progress} == {4}
        finished = next(e for e in events if e["event"] == "round_finished")
        assert "federated_accuracy" not in finished
        run = api.GetRun(cpb.GetRunRequest(run_id="typed"), timeout=10)
        settings = json.loads(run.settings_json)
        assert settings["training"]["local_batches"] == 4 and settings["evaluation"]["federated_evaluation"] is False
        # the server's defaults apply where the request is silent
        api.StartRun(
            cpb.RunSpec(
                run_id="defaults",
                rounds=1,
                workers=digits_cluster.spec.split(","),
                settings=SETTINGS | {"local-batches": "3"},
            ),
            timeout=30,
        )
        finished = next(e for e in watch(api, "defaults") if e["event"] == "round_finished")
        assert "federated_accuracy" in finished
    finally:
        srv.stop()


def _seed_run(runs: Path, run_id: str, started_at: float, state: str = "finished", events: str = "") -> Path:
    directory = runs / run_id
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "spec": {"run_id": run_id, "workers": ["a=127.0.0.1:1"], "settings": {"lr": "x" * 1000}},
                "state": state,
                "rounds": 3,
                "round": 3,
                "started_at": started_at,
                "ended_at": started_at + 1,
            }
        )
    )
    if events:
        (directory / "events.jsonl").write_text(events)
    return directory


def test_a_torn_event_line_and_an_unreadable_run_do_not_stop_the_service(tmp_path):
    runs = tmp_path / "state" / "runs"
    torn = (
        json.dumps({"sequence": 1, "event": "run_started"})
        + "\n"
        + json.dumps({"sequence": 2, "event": "run_ended"})
        + "\n"
        + '{"sequence": 3, "event": "round_sta'
    )
    _seed_run(runs, "torn", 100.0, events=torn)
    broken = runs / "broken"
    broken.mkdir()
    (broken / "run.json").write_text('{"run_id": "broken", "spec": ')
    srv = Server(tmp_path / "state").start()
    try:
        api = stub(srv.address)
        assert [r.run_id for r in api.ListRuns(cpb.ListRunsRequest(), timeout=10).runs] == ["torn"]
        assert [e["sequence"] for e in watch(api, "torn")] == [1, 2]
        assert (tmp_path / "state" / "unreadable" / "broken" / "run.json").is_file()
        log = srv.log_path.read_text()
        assert "events_torn_line_dropped" in log and str(runs / "torn" / "events.jsonl") in log
        assert "run_unreadable" in log
    finally:
        srv.stop()


def test_listruns_pages_through_summaries_and_old_finished_runs_are_retained_up_to_keep_runs(tmp_path):
    runs = tmp_path / "state" / "runs"
    for i in range(9):
        _seed_run(runs, f"run-{i}", 1000.0 + i)
    _seed_run(runs, "stopped-0", 10.0, state="stopped")  # resumable: never removed
    srv = Server(tmp_path / "state", "--keep-runs", "7").start()
    try:
        api = stub(srv.address)
        seen, token, pages = [], "", 0
        while True:
            page = api.ListRuns(cpb.ListRunsRequest(page_size=3, page_token=token), timeout=10)
            assert all(not r.HasField("spec") and not r.settings_json for r in page.runs)
            seen += [r.run_id for r in page.runs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [f"run-{i}" for i in range(8, 1, -1)] + ["stopped-0"] and pages == 3
        assert not (runs / "run-0").exists() and not (runs / "run-1").exists()
        assert api.GetRun(cpb.GetRunRequest(run_id="run-5"), timeout=10).spec.settings["lr"] == "x" * 1000
        with pytest.raises(grpc.RpcError) as err:
            api.ListRuns(cpb.ListRunsRequest(page_size=10_000), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        srv.stop()


def _serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "serve",
            "--port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "flags, phrase",
    [
        (["--host", "0.0.0.0"], "anyone who reaches 0.0.0.0"),
        (["--host", "0.0.0.0", "--api-token-file", "TOKEN"], "the bearer token would cross the network in plaintext"),
        (["--token-file", "TOKEN", "--allow-workers", "10.0.0.0/24"], "the workers' token would cross the network"),
    ],
)
def test_serve_refuses_to_be_unsafe_beyond_loopback_unless_told_insecure(tmp_path, flags, phrase):
    (tmp_path / "token").write_text("secret\n")
    flags = [str(tmp_path / "token") if f == "TOKEN" else f for f in flags]
    proc = _serve(tmp_path, *flags)
    assert proc.returncode == 2 and phrase in proc.stdout and "--insecure" in proc.stdout, proc.stdout


def test_serve_with_insecure_says_so_in_listruns(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator_service",
            "serve",
            "--host",
            "0.0.0.0",
            "--insecure",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        import time

        deadline = time.monotonic() + 60
        while True:
            try:
                runs = stub(f"127.0.0.1:{port}").ListRuns(cpb.ListRunsRequest(), timeout=2)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.3)
        assert runs.warning.startswith("--insecure: anyone who reaches 0.0.0.0:")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "coordinator_insecure" in out


def test_a_worker_beyond_loopback_needs_credentials_or_insecure_which_getinfo_shows(tmp_path):
    from tests.integration.conftest import DIGITS

    base = [sys.executable, "-m", "worker_service", "--id", "w", *DIGITS, "--log-format", "json"]
    proc = subprocess.run(
        [*base, "--host", "0.0.0.0", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "refusing to serve: anyone who reaches 0.0.0.0" in proc.stdout, proc.stdout
    port = free_port()
    worker = subprocess.Popen(
        [*base, "--host", "0.0.0.0", "--port", str(port), "--insecure"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import asyncio

        from coordinator_service.local import wait_serving

        asyncio.run(wait_serving(f"127.0.0.1:{port}", worker, timeout=120))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.warning.startswith("--insecure: anyone who reaches 0.0.0.0:")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_a_default_worker_listens_on_loopback_only(tmp_path):
    from tests.integration.conftest import DIGITS

    port = free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker_service", "--id", "w", *DIGITS, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import asyncio

        from coordinator_service.local import wait_serving

        asyncio.run(wait_serving(f"127.0.0.1:{port}", worker, timeout=120))
        with socket.socket() as s:  # another loopback address reaches 0.0.0.0, never 127.0.0.1
            assert s.connect_ex(("127.0.0.2", port)) != 0
        if shutil.which("ss"):
            [line] = subprocess.run(
                ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True
            ).stdout.splitlines()
            assert "127.0.0.1" in line.split()[3], line  # the local address: 127.0.0.1 (maybe IPv4-mapped)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def test_the_operator_token_alone_is_refused_beyond_loopback_but_fine_on_it(tmp_path):
    pki = tmp_path / "pki"
    certs.make_all(pki, workers=0)
    srv = Server(tmp_path / "state", "--api-token-file", str(pki / "operator-token")).start()  # on 127.0.0.1
    try:
        token = (pki / "operator-token").read_text().strip()
        runs = stub(srv.address).ListRuns(
            cpb.ListRunsRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        assert runs.warning == ""
    finally:
        srv.stop()


def test_serve_takes_run_defaults_from_its_config_file_under_the_environment(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text("lr = 0.2\nmomentum = 0.5\nkeep-runs = 7\n")
    srv = Server(tmp_path / "state", "--config", str(config), env={"FEDPI_MOMENTUM": "0.6"}).start()
    try:
        api = stub(srv.address)
        api.StartRun(
            cpb.RunSpec(run_id="c", workers=["a=127.0.0.1:1"], timeouts=cpb.Timeouts(handshake_timeout=1)), timeout=30
        )
        training = json.loads(api.GetRun(cpb.GetRunRequest(run_id="c"), timeout=10).settings_json)["training"]
        assert (training["lr"], training["momentum"]) == (0.2, 0.6)  # the file's, and the environment's over it
    finally:
        srv.stop()
