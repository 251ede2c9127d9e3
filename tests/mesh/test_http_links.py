"""Link measurement over HTTP: peers on one machine are not probed over loopback."""

from __future__ import annotations

import socket

import aiohttp

from meshshard.mesh.http import LOOPBACK, HttpTransport
from meshshard.security import Sealer


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_loopback_link_is_taken_as_loopback_not_probed() -> None:
    """A probe would time the two ends' CPU (5 ms round trips while peers load their shards,
    0.5 idle) and the plan would follow it. Nothing listens at the port, so a probe would be
    refused: the transport answers without one."""
    port = _unused_port()
    async with aiohttp.ClientSession() as http:
        transport = HttpTransport(http, Sealer(None, "m"))
        for host in ("127.0.0.1", "127.0.0.2", "localhost", "[::1]"):
            assert await transport.measure(f"{host}:{port}", 1.0) == LOOPBACK
