"""Worker addressing: explicit lists and DNS discovery."""

from __future__ import annotations

import asyncio

import pytest

from coordinator_service.worker_client import DiscoveryFailed, discover, parse_workers


def test_parse_workers_names_and_addresses():
    assert parse_workers("alice=127.0.0.1:1,10.0.0.2:50051") == [("alice", "127.0.0.1:1"),
                                                                  ("10.0.0.2:50051", "10.0.0.2:50051")]


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
