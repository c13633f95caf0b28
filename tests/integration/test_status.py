"""`fedpi status` against live workers (and one that is not there)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedpi.net.protocol import PROTOCOL_VERSION
from tests.conftest import ROOT


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpi_cli", "status", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_status_lists_every_worker_and_names_the_missing_one(digits_cluster):
    spec = digits_cluster.spec + ",ghost=127.0.0.1:1"
    proc = _status("--workers", spec, "--json", "--timeout", "3")
    assert proc.returncode == 1  # one worker is unreachable
    rows = {r["worker"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"alice", "bob", "charlie", "ghost"}
    assert rows["alice"]["workerId"] == "alice" and rows["alice"]["protocolVersion"] == PROTOCOL_VERSION
    assert rows["bob"]["partition"] == "1/3 iid seed=0" and rows["bob"]["modelArchitecture"] == "reference-cnn"
    assert "UNAVAILABLE" in rows["ghost"]["error"] or "DEADLINE" in rows["ghost"]["error"]


def test_status_table(digits_cluster):
    proc = _status("--workers", digits_cluster.spec)
    assert proc.returncode == 0, proc.stderr
    for text in ("fedpi workers", "alice", "charlie", "reference-cnn", "digits-5k", PROTOCOL_VERSION, "idle"):
        assert text in proc.stdout
