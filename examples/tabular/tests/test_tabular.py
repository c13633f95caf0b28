"""The breast-cancer task: its data and model on their own, then trained across three real workers, and refused next
to a worker running another version of it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import torch
from fedpi_tabular import TEST_ROWS, BreastCancerTask

from coordinator_service.local import LocalCluster, LocalWorker
from fedpi.task import Partition, initial_model, task_class


def test_registered_under_its_name():
    assert task_class("breast-cancer") is BreastCancerTask


def test_the_data_is_the_same_on_every_machine_and_cut_into_disjoint_shares():
    task = BreastCancerTask()
    train, test = task.load_dataset()
    assert (len(train), len(test)) == (569 - TEST_ROWS, TEST_ROWS)
    again, _ = BreastCancerTask().load_dataset()
    assert torch.equal(train.tensors[0], again.tensors[0])
    # standardised with the training rows' statistics
    assert train.tensors[0].mean(0).abs().max() < 1e-5
    shares = [task.load_data(Partition(i, 3))[0] for i in range(3)]
    rows = torch.cat([s.tensors[0] for s in shares])
    assert len(rows) == len(train) and len(torch.unique(rows, dim=0)) == len(train)


def run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator_service", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def events(stdout: str, name: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


def test_three_workers_train_it_and_the_reported_accuracy_is_the_model_s(tmp_path):
    proc = run("demo", "--task", "breast-cancer", "--rounds", "3", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(len(m["workers"]) == 3 for m in metrics)
    task = BreastCancerTask()
    model = initial_model(task)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    loss, accuracy = task.evaluate(model, task.load_dataset()[1])
    assert metrics[-1]["test_accuracy"] == round(accuracy, 4) and metrics[-1]["test_loss"] == round(loss, 4)
    assert accuracy > 0.9  # 63% of the tumours are benign: a model that learnt nothing scores at most that


def test_a_worker_with_another_version_of_the_task_is_refused_naming_both(tmp_path):
    # Version 2.0 of the task, as its author might publish it: a wider hidden layer.
    (tmp_path / "tabular_v2.py").write_text(
        textwrap.dedent("""
        from fedpi_tabular import BreastCancerTask

        class BreastCancerTaskV2(BreastCancerTask):
            version = "2.0"
            hidden = 64
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with LocalCluster([LocalWorker("pi", ["--task", "breast-cancer"], tmp_path)]) as cluster:  # runs 1.0
        asyncio.run(cluster.wait_serving(timeout=120))
        proc = run(
            "train",
            "--task",
            "tabular_v2:BreastCancerTaskV2",
            "--workers",
            cluster.spec,
            "--rounds",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            env=env,
        )
    assert proc.returncode == 1
    [failed] = events(proc.stdout, "worker_handshake_failed")
    assert "worker runs task breast-cancer 1.0" in failed["reason"]
    assert "coordinator trains task breast-cancer 2.0" in failed["reason"]
    assert "their models differ" in failed["reason"]
    assert not (tmp_path / "run" / "model.pt").exists()
