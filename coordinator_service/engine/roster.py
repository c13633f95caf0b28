"""Every worker the coordinator knows of, which of them take part now, and how dropped ones come back.

A worker that fails a round is dropped from the round, not from the run: before every round each absent worker
gets a fresh handshake, and one that answers (a restarted process, a rebooted Pi) takes part again. With DNS
discovery the name is resolved again before every round too, so a pod that comes back on a new address is found.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from coordinator_service.engine.discovery import resolve
from coordinator_service.engine.worker_client import Expected, WorkerClient
from coordinator_service.engine.worker_errors import WorkerError, WorkerIncompatible, WorkerRefusedUs
from coordinator_service.policy.strategy import Failure

log = structlog.get_logger()


class HandshakeFailed(Exception):
    """Fewer workers than required passed the handshake."""


class Roster:
    def __init__(
        self,
        make_client: Callable[[str, str], WorkerClient],
        *,
        expected: Expected,
        workers: Sequence[tuple[str, str]] = (),
        dns: str | None = None,
        handshake_timeout: float = 10.0,
    ):
        self._make_client = make_client
        self.expected = expected
        self.dns = dns
        self.handshake_timeout = handshake_timeout
        self.clients: dict[str, WorkerClient] = {}  # by address, in the order first seen
        self._active: set[str] = set()
        self._from_dns: set[str] = set()  # addresses found by DNS: named by the worker id they report
        self._numbers: dict[str, int] = {}  # worker name -> stable number (seeds its batch order)
        self._away: dict[str, Failure] = {}  # by address: why a known worker takes no part now
        for name, address in workers:
            self.clients[address] = make_client(name, address)
            self._numbers[name] = len(self._numbers)

    @property
    def away(self) -> list[Failure]:
        """Every known worker that takes no part now, and why: refused at the handshake (another task, version or
        credentials) or unavailable (not answering)."""
        return [f for a, f in self._away.items() if a in self.clients and a not in self._active]

    @property
    def active(self) -> list[WorkerClient]:
        return [c for a, c in self.clients.items() if a in self._active]

    def index(self, client: WorkerClient) -> int:
        """A stable number per worker name (seeds its batch order), whoever else is present or has left."""
        return self._numbers.setdefault(client.name, len(self._numbers))

    async def refresh(self) -> None:
        """Reconcile the roster with what DNS says now: new addresses get a client; addresses DNS no longer gives
        and that take no part now are forgotten, so a pod that moved costs no handshake timeout every round."""
        if self.dns is None:
            return
        found = [address for _, address in await resolve(self.dns)]
        for address in found:
            if address not in self.clients:
                self.clients[address] = self._make_client(address, address)
                self._from_dns.add(address)
        for address in [a for a in self._from_dns if a not in found and a not in self._active]:
            await self._forget(address, "no longer in DNS")

    async def _forget(self, address: str, reason: str) -> None:
        client = self.clients.pop(address)
        self._from_dns.discard(address)
        self._active.discard(address)
        self._away.pop(address, None)
        log.info("worker_forgotten", worker=client.name, address=address, reason=reason)
        await client.close()

    async def admit(self) -> list[WorkerClient]:
        """Handshake every absent worker (bounded by handshake_timeout); return those that joined."""
        await self.refresh()
        absent = [c for a, c in self.clients.items() if a not in self._active]
        results = await asyncio.gather(
            *(asyncio.wait_for(c.handshake(self.expected), self.handshake_timeout) for c in absent),
            return_exceptions=True,
        )
        joined = []
        for client, info in zip(absent, results):
            if isinstance(info, (WorkerIncompatible, WorkerRefusedUs)):
                # Needs a person: another version, model or credentials. Said loudly, and tried again next round.
                log.error("worker_handshake_failed", worker=client.name, address=client.address, reason=str(info))
                self._away[client.address] = Failure(client.name, "refused", str(info))
                continue
            if isinstance(info, (WorkerError, asyncio.TimeoutError)):
                reason = str(info) or f"no answer within {self.handshake_timeout:.0f} s"
                log.info("worker_unavailable", worker=client.name, address=client.address, reason=reason)
                self._away[client.address] = Failure(client.name, "unavailable", reason)
                continue
            if isinstance(info, BaseException):
                raise info
            if info.worker_id and (client.address in self._from_dns or client.name == client.address):
                await self._claim_name(client, info.worker_id)  # found by address: use the id it gives itself
            log.info(
                "worker_ready",
                worker=client.name,
                address=client.address,
                protocol=info.protocol_version,
                software=info.software_version,
                task=f"{info.task} {info.task_version}".strip(),
                dataset=info.dataset,
                partition=info.partition,
                train_samples=info.train_samples,
                arch=info.cpu_architecture,
                torch=info.torch_version,
                weights_round=info.weights_round,
            )
            if self.expected.dataset and info.dataset != self.expected.dataset:
                log.warning(
                    "dataset_differs",
                    worker=client.name,
                    worker_dataset=info.dataset,
                    coordinator_dataset=self.expected.dataset,
                )
            if info.task_version and info.task_version != self.expected.task_version:
                log.warning(
                    "task_version_differs",
                    worker=client.name,
                    worker_version=info.task_version,
                    coordinator_version=self.expected.task_version,
                    note="the models match, so they train together",
                )
            self._active.add(client.address)
            self._away.pop(client.address, None)
            joined.append(client)
        return joined

    async def _claim_name(self, client: WorkerClient, worker_id: str) -> None:
        """A DNS-found worker is named by the id it reports, now: an address reused by another pod takes the new
        pod's name, and another address still holding that name is a pod's old address, forgotten."""
        if client.name != worker_id:
            log.info("worker_identified", address=client.address, worker=worker_id, previously=client.name)
            client.name = worker_id
        for address, other in list(self.clients.items()):
            if other is not client and other.name == worker_id and address in self._from_dns:
                await self._forget(address, f"{worker_id} answers at {client.address} now")

    def drop(self, name: str) -> None:
        self._active -= {c.address for c in self.clients.values() if c.name == name}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients.values()))
