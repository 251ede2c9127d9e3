"""The control plane over HTTP: a client Transport and the server routes beside it.

Every control message is one CBOR body POSTed to /mesh/control; the answer is another.
Link measurement uses /mesh/echo (round trip) and /mesh/bulk (a timed transfer).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from meshshard.mesh.node import ControlNode, TransportError
from meshshard.mesh.types import LinkStat
from meshshard.wire import MAX_CONTROL_BYTES, ControlMessage, WireError, decode, encode

CBOR = "application/cbor"
BULK_BYTES = 256 * 1024  # one timed transfer to estimate a link's bandwidth
MAX_BULK = 8 * 1024 * 1024


class HttpTransport:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage:
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    f"http://{addr}/mesh/control", data=encode(msg), headers={"Content-Type": CBOR}
                ) as resp:
                    body = await resp.content.read(MAX_CONTROL_BYTES + 1)
                    if resp.status != 200:
                        raise TransportError(f"{addr}: HTTP {resp.status}: {body[:200]!r}")
                    return decode(body)
        except (TimeoutError, aiohttp.ClientError, OSError, WireError) as e:
            raise TransportError(f"{addr}: {e or type(e).__name__}") from None

    async def measure(self, addr: str, timeout: float) -> LinkStat:
        try:
            async with asyncio.timeout(timeout):
                rtts = []
                for _ in range(3):
                    start = time.perf_counter()
                    async with self._session.get(f"http://{addr}/mesh/echo") as resp:
                        await resp.read()
                    rtts.append(time.perf_counter() - start)
                rtt = min(rtts)
                start = time.perf_counter()
                async with self._session.get(
                    f"http://{addr}/mesh/bulk", params={"bytes": str(BULK_BYTES)}
                ) as resp:
                    size = len(await resp.read())
                took = max(time.perf_counter() - start - rtt, 1e-6)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransportError(f"{addr}: {e or type(e).__name__}") from None
        return LinkStat(mbps=round(size * 8 / took / 1e6, 3), rtt_ms=round(rtt * 1e3, 4))


def control_routes(node: ControlNode) -> list[web.RouteDef]:
    async def handle_control(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_CONTROL_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_CONTROL_BYTES, actual_size=request.content_length
            )
        body = await request.content.read(MAX_CONTROL_BYTES + 1)
        try:
            msg = decode(body)
            reply = await node.handle(msg)
        except (WireError, TransportError) as e:
            return web.Response(status=400, text=f"bad control message: {e}")
        return web.Response(body=encode(reply), content_type=CBOR)

    async def handle_echo(request: web.Request) -> web.Response:
        return web.Response(body=b"ok")

    async def handle_bulk(request: web.Request) -> web.Response:
        try:
            size = min(int(request.query.get("bytes", BULK_BYTES)), MAX_BULK)
        except ValueError:
            raise web.HTTPBadRequest(text="bytes must be an integer") from None
        return web.Response(body=bytes(max(size, 0)))

    return [
        web.post("/mesh/control", handle_control),
        web.get("/mesh/echo", handle_echo),
        web.get("/mesh/bulk", handle_bulk),
    ]
