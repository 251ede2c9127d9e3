"""The demo's port check: a port someone listens on is taken; one a demo just left is free."""

from __future__ import annotations

import socket
import time

import pytest

from meshshard.demo import _check_ports_free
from meshshard.errors import MeshShardError


def test_a_listening_port_is_taken_and_a_just_closed_one_is_free() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    with pytest.raises(MeshShardError, match=f"port {port} is in use"):
        _check_ports_free([port])
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection lingers in TIME_WAIT
    time.sleep(0.05)
    client.close()
    server.close()
    _check_ports_free([port])
