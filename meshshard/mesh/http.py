"""The control plane over HTTP: a client Transport and the server routes beside it.

Every control message is one sealed CBOR body POSTed to /mesh/control; the answer is another.
Link measurement POSTs sealed requests to /mesh/echo (round trip) and /mesh/bulk (a timed
transfer). A request that does not open with the mesh key is refused with 403, unread further.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Any

import aiohttp
from aiohttp import web

from meshshard.delays import NONE, Delays
from meshshard.mesh.node import ControlNode, TransportError
from meshshard.mesh.types import LinkStat
from meshshard.security import CONTROL, CONTROL_REPLY, OVERHEAD, PROBE, AuthError, Sealer
from meshshard.wire import MAX_CONTROL_BYTES, ControlMessage, WireError, decode, encode

logger = logging.getLogger(__name__)

CBOR = "application/cbor"
BULK_BYTES = 256 * 1024  # one timed transfer to estimate a fast link's bandwidth
SMALL_BULK_BYTES = 16 * 1024  # ... and a first, small one, enough for a slow link
MAX_BULK = 8 * 1024 * 1024


MAX_BODY = MAX_CONTROL_BYTES + OVERHEAD


class HttpTransport:
    def __init__(
        self, session: aiohttp.ClientSession, sealer: Sealer, delays: Delays = NONE
    ) -> None:
        self._session = session
        self._sealer = sealer
        self._delays = delays

    async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage:
        body = self._sealer.seal(CONTROL, encode(msg))
        try:
            async with asyncio.timeout(timeout):
                await self._delay(addr)
                async with self._session.post(
                    f"http://{addr}/mesh/control", data=body, headers={"Content-Type": CBOR}
                ) as resp:
                    answer = await resp.content.read(MAX_BODY + 1)
                    if resp.status != 200:
                        raise TransportError(f"{addr}: HTTP {resp.status}: {answer[:200]!r}")
                    return decode(self._sealer.open(CONTROL_REPLY, answer))
        except (TimeoutError, aiohttp.ClientError, OSError, WireError, AuthError) as e:
            raise TransportError(f"{addr}: {e or type(e).__name__}") from None

    async def measure(self, addr: str, timeout: float) -> LinkStat:
        try:
            async with asyncio.timeout(timeout):
                rtts = []
                for _ in range(3):
                    start = time.perf_counter()
                    await self._delay(addr)
                    async with self._session.post(
                        f"http://{addr}/mesh/echo", data=self._probe(0)
                    ) as resp:
                        await resp.read()
                    rtts.append(time.perf_counter() - start)
                rtt = min(rtts)
                # A small transfer first: a slow link would take seconds to move a big one.
                for size in (SMALL_BULK_BYTES, BULK_BYTES):
                    took = await self._bulk(addr, size, rtt)
                    if took > 0.05:
                        break
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransportError(f"{addr}: {e or type(e).__name__}") from None
        return LinkStat(mbps=round(size * 8 / took / 1e6, 3), rtt_ms=round(rtt * 1e3, 4))

    async def _bulk(self, addr: str, size: int, rtt: float) -> float:
        """Seconds to move `size` bytes from `addr`, less one round trip."""
        start = time.perf_counter()
        await self._delay(addr)
        async with self._session.post(f"http://{addr}/mesh/bulk", data=self._probe(size)) as r:
            if len(await r.read()) != size:
                raise TransportError(f"{addr}: short bulk transfer")
        return max(time.perf_counter() - start - rtt, 1e-6)

    async def _delay(self, addr: str) -> None:
        if wait := self._delays.to(addr):
            await asyncio.sleep(wait)

    def _probe(self, size: int) -> bytes:
        return self._sealer.seal(PROBE, struct.pack(">Q", size))


def delay_answers(delays: Delays) -> Any:
    """Middleware: answers wait a testbed's link delay back to the asker, as requests do."""

    @web.middleware
    async def delay(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if wait := delays.to(request.remote):
            await asyncio.sleep(wait)
        return response

    return delay


def control_routes(node: ControlNode, sealer: Sealer) -> list[web.RouteDef]:
    refused = 0

    async def opened(request: web.Request, purpose: bytes) -> bytes:
        """The request's payload, or a 4xx: too large (unread), or not sealed for this mesh."""
        nonlocal refused
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY, actual_size=request.content_length
            )
        body = await request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(body))
        try:
            return sealer.open(purpose, body)
        except AuthError as e:
            refused += 1
            if refused <= 3 or refused % 1000 == 0:
                logger.warning("refused a control request from %s (%d so far): %s",
                               request.remote, refused, e)  # fmt: skip
            raise web.HTTPForbidden(text=f"refused: {e}") from None

    async def handle_control(request: web.Request) -> web.Response:
        payload = await opened(request, CONTROL)
        try:
            reply = await node.handle(decode(payload))
        except (WireError, TransportError) as e:
            return web.Response(status=400, text=f"bad control message: {e}")
        return web.Response(body=sealer.seal(CONTROL_REPLY, encode(reply)), content_type=CBOR)

    async def handle_echo(request: web.Request) -> web.Response:
        await opened(request, PROBE)
        return web.Response(body=b"ok")

    async def handle_bulk(request: web.Request) -> web.Response:
        payload = await opened(request, PROBE)
        if len(payload) != 8:
            raise web.HTTPBadRequest(text="a bulk probe names its size in 8 bytes")
        size = min(struct.unpack(">Q", payload)[0], MAX_BULK)
        return web.Response(body=bytes(size))

    return [
        web.post("/mesh/control", handle_control),
        web.post("/mesh/echo", handle_echo),
        web.post("/mesh/bulk", handle_bulk),
    ]
