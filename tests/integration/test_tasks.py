"""Tasks other than the built-in one, over real gRPC: a run of a task named as module:Class, the handshake refusing
a worker with another task or another model version before any weights move, and workers that cannot start."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from coordinator_service.local import LocalWorker, free_port
from fedpi.task import initial_model
from generated.fedpi.v1 import worker_pb2 as pb
from generated.fedpi.v1 import worker_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.integration.conftest import METADATA, events, run_coordinator, start_cluster
from tests.tiny_task import TinyTask

TINY = "tests.tiny_task:TinyTask"


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    cluster = start_cluster(
        [
            LocalWorker(name, ["--task", TINY, "--partition", f"{i}/3", "--threads", "1"], logs)
            for i, name in enumerate(["alice", "bob", "charlie"])
        ]
    )
    yield cluster
    cluster.stop()


def weights_round(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.WorkerStub(channel).GetInfo(pb.GetInfoRequest(), metadata=METADATA, timeout=10)
    assert info.task == "tiny" and info.task_version == "1.0"
    return info.weights_round


def test_a_task_named_by_module_and_class_trains_and_scores_with_its_own_evaluation(tiny_cluster, tmp_path):
    proc = run_coordinator(
        "train",
        "--task",
        TINY,
        "--workers",
        tiny_cluster.spec,
        "--rounds",
        "3",
        "--local-batches",
        "5",
        "--batch-size",
        "32",
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(len(m["workers"]) == 3 for m in metrics)
    assert sum(m["workers"]["bob"]["samples"] for m in metrics) == 3 * 5 * 32
    # The reported accuracy is the task's evaluation of the final model on its 200 test points, recomputed here.
    task = TinyTask()
    model = initial_model(task)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    loss, accuracy = task.evaluate(model, task.load_dataset()[1])
    assert metrics[-1]["test_accuracy"] == round(accuracy, 4) and metrics[-1]["test_loss"] == round(loss, 4)
    assert accuracy > 0.85  # the blobs are separable: a model that did not train would sit near 0.5
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["task"] == "tiny 1.0" and config["model"] == "tiny"


def test_a_task_without_test_data_for_the_coordinator_is_scored_by_the_workers(tiny_cluster, tmp_path):
    proc = run_coordinator(
        "train",
        "--task",
        "tests.tiny_task:NoTestData",
        "--workers",
        tiny_cluster.spec,
        "--rounds",
        "2",
        "--local-batches",
        "5",
        "--federated-evaluation",
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "test_accuracy" not in metrics[-1] and metrics[-1]["federated_samples"] == 200
    # the workers' test shares, recomputed here: the weighted mean of each worker's figure
    task = TinyTask()
    model = initial_model(task)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    _, accuracy = task.evaluate(model, task.load_dataset()[1])
    assert metrics[-1]["federated_accuracy"] == round(accuracy, 4)


@pytest.mark.parametrize(
    "task, phrase",
    [
        (
            "tests.tiny_task:TinyTaskWide",
            "their models differ (tensor names, dtypes or shapes); install the same version",
        ),
        ("tests.tiny_task:OtherTask", "start both with the same --task (FEDPI_TASK)"),
    ],
)
def test_another_task_or_model_version_is_refused_before_any_weights_move(tiny_cluster, tmp_path, task, phrase):
    before = [weights_round(w.address) for w in tiny_cluster.workers]
    proc = run_coordinator(
        "train", "--task", task, "--workers", tiny_cluster.spec, "--rounds", "1", "--output-dir", str(tmp_path)
    )
    assert proc.returncode == 1
    failed = [e for e in events(proc.stdout) if e.get("event") == "worker_handshake_failed"]
    assert len(failed) == 3
    reason = failed[0]["reason"]
    assert "worker runs task tiny 1.0 (model tiny, manifest " in reason and phrase in reason
    assert ("coordinator trains task tiny 2.0" if "Wide" in task else "coordinator trains task other 1.0") in reason
    assert before == [weights_round(w.address) for w in tiny_cluster.workers]  # nothing was installed


def test_a_new_version_with_the_same_model_trains_with_a_warning(tiny_cluster, tmp_path):
    proc = run_coordinator(
        "train",
        "--task",
        "tests.tiny_task:TinyTaskPatched",
        "--workers",
        tiny_cluster.spec,
        "--rounds",
        "1",
        "--local-batches",
        "2",
        "--output-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    warned = [e for e in events(proc.stdout) if e.get("event") == "task_version_differs"]
    assert len(warned) == 3 and warned[0]["worker_version"] == "1.0" and warned[0]["coordinator_version"] == "1.1"


def _start_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "worker_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--log-format",
            "json",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--task", "tests.tiny_task:BrokenOnOneWorker", "--partition", "1/3"],
            "task 'broken': loading the data of partition 1/3 iid seed=0 failed: OSError: /data/sensor-1.csv: No such file",  # noqa: E501
        ),
        (
            ["--task", "sensors.tasks:Sensor"],
            "--task sensors.tasks:Sensor: cannot import module 'sensors.tasks': ModuleNotFoundError: No module named 'sensors'",  # noqa: E501
        ),
        (
            ["--task", "tests.tiny_task:ComplexBuffer"],
            "task 'complex-buffer': state_dict entry 'phase' has dtype float8_e4m3fnuz, which fedpi's wire format cannot",  # noqa: E501
        ),
    ],
)
def test_a_worker_that_cannot_load_its_task_says_why_and_exits(args, message):
    proc = _start_worker(*args)
    assert proc.returncode == 2
    [failure] = [e for e in events(proc.stdout) if e.get("event") == "worker_failed_to_start"]
    assert message in failure["reason"]
