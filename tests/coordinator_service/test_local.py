"""The local cluster's port picking."""

from __future__ import annotations

import socket

from coordinator_service import local


class _Socket:
    """The kernel's free-port choice, scripted: it may name a port it named before, once that socket closed."""

    ports: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        pass

    def getsockname(self):
        return ("127.0.0.1", _Socket.ports.pop(0))


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """Ports picked before their workers bind (a worker's gRPC and metrics ports) must differ, even where the kernel
    offers the same free port again."""
    monkeypatch.setattr(local, "_handed_out", set())
    monkeypatch.setattr(local.socket, "socket", _Socket)
    _Socket.ports = [50001, 50001, 50002, 50001, 50002, 50003]
    assert [local.free_port(), local.free_port(), local.free_port()] == [50001, 50002, 50003]


def test_free_port_gives_a_port_that_can_be_bound():
    port = local.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
