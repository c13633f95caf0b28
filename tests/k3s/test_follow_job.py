"""`make train` follows the coordinator's Job through k3s/follow-job, run here against a fake kubectl that plays
recorded cluster states: the pod not created yet, a pod that fails before it is Ready, a pod that succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FAKE_KUBECTL = r'''#!PYTHON
import json, sys
from pathlib import Path
state = Path(sys.argv[0]).with_name("state.json")
s = json.loads(state.read_text())
args = sys.argv[3:]  # after "-n NAMESPACE"
s["calls"].append(" ".join(args))
def step(key):
    seq = s[key]
    value = seq[0] if len(seq) == 1 else seq.pop(0)
    return value
out = ""
if args[:2] == ["get", "pods"]:
    out = step("pods")
elif args[:2] == ["get", "pod"] and "phase" in args[-1]:
    out = step("phase")
elif args[:2] == ["get", "pod"] and "waiting" in args[-1]:
    out = step("waiting")
elif args[:1] == ["logs"]:
    out = s["log"]
elif args[:2] == ["get", "job"]:
    out = s["job_succeeded"] if "succeeded" in args[-1] else s["job_failed"]
elif args[:1] == ["describe"]:
    out = "Events: Warning  Failed  pull access denied\n"
state.write_text(json.dumps(s))
sys.stdout.write(out)
'''


def _follow(tmp_path, **scenario) -> tuple[subprocess.CompletedProcess, dict]:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable))
    kubectl.chmod(0o755)
    state = {"calls": [], "pods": [""], "phase": ["Pending"], "waiting": [""], "log": "", "job_succeeded": "",
             "job_failed": "", **scenario}
    (tmp_path / "state.json").write_text(json.dumps(state))
    proc = subprocess.run([str(ROOT / "k3s" / "follow-job"), "fedpi", "fedpi-train", "20"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "KUBECTL": str(kubectl), "FOLLOW_JOB_POLL": "0.1"})
    return proc, json.loads((tmp_path / "state.json").read_text())


def test_a_pod_not_created_yet_is_waited_for_then_followed_from_its_first_line(tmp_path):
    proc, state = _follow(tmp_path, pods=["", "", "", "fedpi-train-x"], phase=["Pending", "Pending", "Running"],
                          log='{"event": "training_started"}\n{"event": "training_finished"}\n', job_succeeded="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == '{"event": "training_started"}'
    assert sum(c.startswith("get pods") for c in state["calls"]) == 4
    assert "logs -f fedpi-train-x" in state["calls"]


def test_a_pod_that_fails_before_it_is_ready_shows_its_log_and_fails(tmp_path):
    proc, state = _follow(tmp_path, pods=["fedpi-train-x"], phase=["Failed"],
                          log='{"event": "training_failed", "reason": "no workers"}\n', job_failed="1")
    assert proc.returncode == 1
    assert "training_failed" in proc.stdout and "job fedpi-train failed" in proc.stderr


def test_a_pod_that_cannot_pull_its_image_says_so_at_once(tmp_path):
    proc, state = _follow(tmp_path, pods=["fedpi-train-x"], phase=["Pending"], waiting=["ImagePullBackOff"])
    assert proc.returncode == 1
    assert "cannot start: ImagePullBackOff" in proc.stderr and "pull access denied" in proc.stderr
    assert not any(c.startswith("logs") for c in state["calls"])


def test_a_pod_that_succeeds_exits_zero(tmp_path):
    proc, _ = _follow(tmp_path, pods=["fedpi-train-x"], phase=["Succeeded"], log="done\n", job_succeeded="1")
    assert proc.returncode == 0 and proc.stdout == "done\n"


@pytest.mark.parametrize("scenario", [{"pods": [""]}])
def test_no_pod_at_all_gives_up_after_the_timeout(tmp_path, scenario):
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable))
    kubectl.chmod(0o755)
    (tmp_path / "state.json").write_text(json.dumps({"calls": [], "pods": [""], "phase": [""], "waiting": [""],
                                                      "log": "", "job_succeeded": "", "job_failed": ""}))
    proc = subprocess.run([str(ROOT / "k3s" / "follow-job"), "fedpi", "fedpi-train", "1"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "KUBECTL": str(kubectl), "FOLLOW_JOB_POLL": "0.1"})
    assert proc.returncode == 1 and "no pod for job fedpi-train after 1 s" in proc.stderr
