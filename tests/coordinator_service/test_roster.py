"""The roster against a fake DNS and fake workers: it follows pods that move and addresses that are reused."""

from __future__ import annotations

import asyncio

import pytest

from coordinator_service.engine import roster as roster_module
from coordinator_service.engine.roster import Roster
from coordinator_service.engine.worker_client import Expected
from coordinator_service.engine.worker_errors import WorkerUnavailable
from generated.fedpi.v1 import worker_pb2 as pb


class FakeClient:
    """Answers the handshake as whichever pod `network` says holds its address now."""

    def __init__(self, network: dict[str, str | None], name: str, address: str):
        self.network, self.name, self.address = network, name, address
        self.closed = False
        self.handshakes = 0

    async def handshake(self, expected: Expected) -> pb.WorkerInfo:
        self.handshakes += 1
        pod = self.network.get(self.address)
        if pod is None:
            raise WorkerUnavailable(self.name, "GetInfo failed with UNAVAILABLE")
        return pb.WorkerInfo(worker_id=pod, train_samples=10, dataset="d")

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def cluster(monkeypatch):
    """`network` maps address -> pod name (None: nobody answers); DNS answers with its keys."""
    network: dict[str, str | None] = {}

    async def resolve(target):
        return [(a, a) for a in sorted(network)]

    monkeypatch.setattr(roster_module, "resolve", resolve)
    made: list[FakeClient] = []

    def make_client(name, address):
        made.append(FakeClient(network, name, address))
        return made[-1]

    roster = Roster(make_client, expected=Expected("m", dataset="d"), dns="fedpi-worker:50051", handshake_timeout=1)
    return network, roster, made


def _names(roster):
    return sorted((c.name, c.address) for c in roster.active)


def test_a_pod_on_a_new_address_replaces_its_old_entry(cluster):
    # Prepare
    network, roster, made = cluster
    network.update({"10.0.0.1:1": "worker-0", "10.0.0.2:1": "worker-1"})
    asyncio.run(roster.admit())
    # Execute: worker-1 restarts on a new IP; its old IP answers nothing and leaves DNS.
    roster.drop("worker-1")
    del network["10.0.0.2:1"]
    network["10.0.0.9:1"] = "worker-1"
    asyncio.run(roster.admit())
    asyncio.run(roster.admit())
    # Assert
    assert _names(roster) == [("worker-0", "10.0.0.1:1"), ("worker-1", "10.0.0.9:1")]
    old = next(c for c in made if c.address == "10.0.0.2:1")
    assert old.closed and old.handshakes == 1 and "10.0.0.2:1" not in roster.clients


def test_a_stale_entry_still_in_dns_is_forgotten_once_the_worker_answers_elsewhere(cluster):
    network, roster, made = cluster
    network.update({"10.0.0.1:1": "worker-0", "10.0.0.2:1": "worker-1"})
    asyncio.run(roster.admit())
    roster.drop("worker-1")
    network["10.0.0.2:1"] = None  # DNS still lists the old address (a slow endpoint update)
    network["10.0.0.9:1"] = "worker-1"
    asyncio.run(roster.admit())
    assert _names(roster) == [("worker-0", "10.0.0.1:1"), ("worker-1", "10.0.0.9:1")]
    assert "10.0.0.2:1" not in roster.clients


def test_a_reused_address_takes_the_name_of_the_pod_that_answers_now(cluster):
    network, roster, _ = cluster
    network.update({"10.0.0.1:1": "worker-0", "10.0.0.2:1": "worker-1"})
    asyncio.run(roster.admit())
    # worker-1 moves away; worker-2 gets its old address.
    roster.drop("worker-1")
    network["10.0.0.2:1"] = "worker-2"
    network["10.0.0.3:1"] = "worker-1"
    asyncio.run(roster.admit())
    assert _names(roster) == [("worker-0", "10.0.0.1:1"), ("worker-1", "10.0.0.3:1"), ("worker-2", "10.0.0.2:1")]


def test_seed_numbers_stay_with_the_worker_name(cluster):
    network, roster, _ = cluster
    network.update({"10.0.0.1:1": "worker-0", "10.0.0.2:1": "worker-1"})
    asyncio.run(roster.admit())
    before = {c.name: roster.index(c) for c in roster.active}
    roster.drop("worker-0")
    del network["10.0.0.1:1"]
    network["10.0.0.7:1"] = "worker-0"
    asyncio.run(roster.admit())
    assert {c.name: roster.index(c) for c in roster.active} == before
