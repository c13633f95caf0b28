"""Which workers there are: a --workers list, or the addresses a DNS name resolves to (a Kubernetes headless
Service), waited for until enough of them answer."""

from __future__ import annotations

import asyncio
import socket
import time

import structlog

log = structlog.get_logger()


def parse_workers(spec: str) -> list[tuple[str, str]]:
    """'alice=10.0.0.2:50051,bob=…' -> [(name, address)]; a bare address is named after itself."""
    workers = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, address = item.partition("=")
        if not sep:
            name, address = item, item
        if ":" not in address:
            raise ValueError(f"worker {name!r}: address {address!r} needs a port, e.g. {address}:50051")
        workers.append((name, address))
    names = [n for n, _ in workers]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must be unique: {names}")
    if not workers:
        raise ValueError("no workers given; use --workers alice=HOST:PORT,bob=HOST:PORT")
    return workers


class DiscoveryFailed(Exception):
    """Fewer workers than expected showed up in DNS in time."""


def _join(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_target(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"--workers-dns needs HOST:PORT, e.g. fedpi-worker.fedpi.svc.cluster.local:50051; got {target!r}"
        )
    return host, port


async def resolve(target: str) -> list[tuple[str, str]]:
    """HOST:PORT -> [(address, address)] for every address HOST resolves to now (none if it does not resolve)."""
    host, port = _split_target(target)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return [(_join(a, port), _join(a, port)) for a in sorted({str(info[4][0]) for info in infos})]


async def discover(target: str, expect: int, timeout: float, interval: float = 2.0) -> list[tuple[str, str]]:
    """Resolve HOST:PORT (a Kubernetes headless Service) until it yields `expect` addresses.

    Workers found this way are named by address until their handshake reports their worker id.
    """
    host, _ = _split_target(target)
    deadline = time.monotonic() + timeout
    while True:
        found = await resolve(target)
        if len(found) >= expect:
            return found
        if time.monotonic() > deadline:
            raise DiscoveryFailed(
                f"{host} resolves to {len(found)} worker(s) after {timeout:.0f} s, expected "
                f"{expect}: are the worker pods Ready (kubectl get pods)?"
            )
        log.info("workers_waiting", dns=host, found=len(found), expected=expect)
        await asyncio.sleep(interval)
