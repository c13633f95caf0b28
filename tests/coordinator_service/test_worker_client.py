"""Worker addressing: explicit lists and DNS discovery."""

from __future__ import annotations

import asyncio

import pytest

from coordinator_service.engine.discovery import DiscoveryFailed, discover, parse_workers
from generated.fedpi.v1 import worker_pb2 as pb


def test_parse_workers_names_and_addresses():
    assert parse_workers("alice=127.0.0.1:1,10.0.0.2:50051") == [
        ("alice", "127.0.0.1:1"),
        ("10.0.0.2:50051", "10.0.0.2:50051"),
    ]


@pytest.mark.parametrize("spec, message", [("a=host", "needs a port"), ("a=h:1,a=h:2", "unique"), ("", "no workers")])
def test_parse_workers_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_workers(spec)


def test_discovery_resolves_a_name_to_worker_addresses():
    found = asyncio.run(discover("127.0.0.1:50051", expect=1, timeout=5))
    assert found == [("127.0.0.1:50051", "127.0.0.1:50051")]


def test_discovery_gives_up_with_a_clear_error():
    with pytest.raises(DiscoveryFailed, match="expected 2"):
        asyncio.run(discover("127.0.0.1:50051", expect=2, timeout=0.5, interval=0.1))


def test_discovery_needs_a_port():
    with pytest.raises(ValueError, match="HOST:PORT"):
        asyncio.run(discover("fedpi-worker", expect=1, timeout=1))


def test_the_handshake_compares_task_and_manifest_and_knows_older_workers():
    from coordinator_service.engine.worker_client import Expected

    ours = Expected("tiny", "tiny", "1.0", "aaaa", "tiny")
    same = pb.WorkerInfo(
        protocol_version="1.4", model_architecture="tiny", task="tiny", task_version="1.1", manifest_fingerprint="aaaa"
    )
    assert ours.check(same) is None  # another version, the same tensors
    other = pb.WorkerInfo(
        protocol_version="1.4", model_architecture="tiny", task="tiny", task_version="2.0", manifest_fingerprint="bbbb"
    )
    assert "worker runs task tiny 2.0 (model tiny, manifest bbbb), coordinator trains task tiny 1.0" in ours.check(
        other
    )
    # a 1.3 worker reports no task: only the built-in task can train with it, checked by its model as before
    old = pb.WorkerInfo(protocol_version="1.3", model_architecture="reference-cnn")
    assert "which has no tasks" in ours.check(old)
    assert Expected("reference-cnn", "mnist", "0.1.0", "cccc").check(old) is None
    assert "runs model 'reference-cnn', coordinator trains 'large-mlp'" in Expected(
        "large-mlp", "mnist", "0.1.0", "dddd"
    ).check(old)
