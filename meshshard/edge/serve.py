"""Listening for HTTP with admission control: a cap on open connections per address and in
total, and a deadline for a request's headers, so strangers on the LAN cannot hold a peer's
sockets or memory with idle, slow or countless connections."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from meshshard.errors import MeshShardError

logger = logging.getLogger(__name__)


class ConnectionGate:
    """Admits a new connection only under both caps; a refused one is closed before a byte of
    it is read."""

    def __init__(self, per_host: int, total: int) -> None:
        self.per_host, self.total = per_host, total
        self.refused = 0
        self._open: Counter[str] = Counter()
        self._hosts: dict[object, str] = {}  # a connection's protocol, and its host

    @property
    def open(self) -> int:
        return len(self._hosts)

    def admit(self, handler: object, host: str) -> bool:
        if len(self._hosts) >= self.total or self._open[host] >= self.per_host:
            self.refused += 1
            if self.refused <= 3 or self.refused % 1000 == 0:
                logger.warning(
                    "refused a connection from %s (%d so far): %d open from it, %d in all",
                    host, self.refused, self._open[host], len(self._hosts),
                )  # fmt: skip
            return False
        self._open[host] += 1
        self._hosts[handler] = host
        return True

    def release(self, handler: object) -> None:
        host = self._hosts.pop(handler, None)
        if host is not None:
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]

    def attach(self, server: web.Server) -> None:
        """Wrap the server's connection bookkeeping, the one place aiohttp reports a new
        connection with its transport (there is no hook for it)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if peer else "?"
            if not self.admit(handler, host):
                # On the loop's next turn: aiohttp starts the handler's task after this
                # returns, and one whose connection was already lost fails an assertion,
                # an error with a traceback in the log for every refused connection. Its
                # bytes still reach no handler: the abort runs before any read polled after.
                asyncio.get_running_loop().call_soon(transport.abort)
                return
            made(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self.release(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]


async def serve(
    app: web.Application,
    bind: str,
    port: int,
    what: str,
    gate: ConnectionGate,
    header_timeout: float,
    **kwargs: Any,
) -> web.AppRunner:
    """Listen on bind:port, or a one-line MeshShardError (the port in use, say). A connection
    that has not sent a whole request's headers within `header_timeout` seconds, or sits idle
    that long between requests, is closed (aiohttp's keep-alive timer covers both)."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout, **kwargs)
    await runner.setup()
    assert runner.server is not None
    gate.attach(runner.server)
    try:
        await web.TCPSite(runner, bind, port).start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise MeshShardError(f"port {port} ({what}) is in use on {bind}") from None
        raise MeshShardError(f"cannot listen on {bind}:{port} ({what}): {e.strerror}") from None
    return runner


def names_of(request: web.Request, announced: str) -> tuple[bytes, ...]:
    """The addresses a message for this peer may be sealed for: the one it announces, and
    the one this connection reached (a seed given by hand may name either)."""
    names = [announced.encode()]
    local = request.transport.get_extra_info("sockname") if request.transport else None
    if local:
        names.append(f"{local[0]}:{local[1]}".encode())
    return tuple(names)
