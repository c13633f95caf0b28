"""A listening port is one process's: find out before gRPC does, so that a taken port is one clear line, not a
C-core log line followed by a traceback."""

from __future__ import annotations

import errno
import socket


def check_free(address: str) -> None:
    """Raise OSError naming HOST:PORT if another process listens there (port 0 and unresolvable hosts: left to the
    server, which reports them itself)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR as gRPC sets it: connections of a process that just ended (TIME_WAIT) do not count, a listener
        # does. Never SO_REUSEPORT, which would let the probe share a listener's port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"cannot listen on {address}: is another process using the port?") from None
            raise OSError(f"cannot listen on {address}: {exc.strerror}") from None


def listen(server, address: str, credentials=None) -> int:
    """Add `address` to a grpc.aio server (TLS with `credentials`), or raise OSError in one line naming it."""
    check_free(address)
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}: is another process using the port?")
    return port
