"""A port is free when nothing listens on it, also while a connection of a process that just ended lingers there
(TIME_WAIT): what a worker restarted on its own port meets."""

from __future__ import annotations

import socket

import pytest

from fedpi.net.ports import check_free


def test_a_listener_holds_its_port_and_a_lingering_connection_does_not():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listeners are
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: is another process using the port"):
        check_free(f"127.0.0.1:{port}")
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the port's side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    listener.close()
    check_free(f"127.0.0.1:{port}")
