"""The control plane over HTTP: a client Transport and the server routes beside it.

Every control message is one sealed CBOR body POSTed to /mesh/control, sealed for the address
it is sent to; the answer is another, sealed for that request. Link measurement POSTs sealed
requests to /mesh/echo (round trip) and /mesh/bulk (a timed transfer), answered alike. A body is
read whole (it may arrive in many segments) within a size and a time limit; one that does not
open with the mesh key, for this peer, is refused with 403.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

import aiohttp
from aiohttp import web

from meshshard.config import Timings
from meshshard.edge.bodies import BodyError, request_body, response_body
from meshshard.edge.serve import names_of
from meshshard.mesh.node import ControlNode, TransportError
from meshshard.security import (
    CONTROL,
    CONTROL_REPLY,
    OVERHEAD,
    PROBE,
    PROBE_REPLY,
    AuthError,
    Sealer,
)
from meshshard.types import LinkStat
from meshshard.wire import MAX_CONTROL_BYTES, ControlMessage, WireError, decode, encode
from meshshard.wire.checks import on_loopback

logger = logging.getLogger(__name__)

CBOR = "application/cbor"
# A client's own bound on reading an answer; the caller's timeout is usually shorter.
BODY_SECONDS = 30.0
_REPLIES = {CONTROL: CONTROL_REPLY, PROBE: PROBE_REPLY}
BULK_BYTES = 256 * 1024  # one timed transfer to estimate a fast link's bandwidth
SMALL_BULK_BYTES = 16 * 1024  # ... and a first, small one, enough for a slow link
MAX_BULK = 8 * 1024 * 1024
# Peers on one machine have no link between them: a probe over loopback times the two ends'
# CPU. Probes taken while four peers loaded their shards read round trips of 4.5-5.4 ms where
# idle ones read 0.4-0.6, and a single-host mesh was replanned when its links were first
# measured, 1.4 s after its first plan, onto four stages (one of two units) where three had
# served, and kept them (test_churn, in a fresh-clone CI run). So loopback is not probed: it
# is taken as what idle probes read on this project's test host.
LOOPBACK = LinkStat(mbps=5000.0, rtt_ms=0.5)


MAX_BODY = MAX_CONTROL_BYTES + OVERHEAD


class HttpTransport:
    def __init__(self, http: aiohttp.ClientSession, sealer: Sealer) -> None:
        self._http = http
        self._sealer = sealer

    async def send(self, addr: str, msg: ControlMessage, timeout: float) -> ControlMessage:
        try:
            async with asyncio.timeout(timeout):
                answer = await self._ask(addr, "control", CONTROL, encode(msg), MAX_BODY)
                return decode(answer)
        except (TimeoutError, aiohttp.ClientError, OSError, WireError) as e:
            raise TransportError(f"{addr}: {e or type(e).__name__}", refused(e)) from None

    async def measure(self, addr: str, timeout: float) -> LinkStat:
        if on_loopback(addr):
            return LOOPBACK
        try:
            async with asyncio.timeout(timeout):
                rtts = []
                for _ in range(3):
                    start = time.perf_counter()
                    await self._ask(addr, "echo", PROBE, struct.pack(">Q", 0), OVERHEAD)
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
        got = await self._ask(addr, "bulk", PROBE, struct.pack(">Q", size), size + OVERHEAD)
        if len(got) != size:
            raise TransportError(f"{addr}: short bulk transfer")
        return max(time.perf_counter() - start - rtt, 1e-6)

    async def _ask(
        self, addr: str, route: str, purpose: bytes, payload: bytes, limit: int
    ) -> bytes:
        """POST `payload` sealed for `addr` to /mesh/`route`; the whole answer, opened as an
        answer to this very request (TransportError otherwise)."""
        body = self._sealer.seal(purpose, payload, addr.encode())
        async with self._http.post(
            f"http://{addr}/mesh/{route}", data=body, headers={"Content-Type": CBOR}
        ) as resp:
            try:
                answer = await response_body(resp, limit, BODY_SECONDS)
            except BodyError as e:
                raise TransportError(f"{addr}: {e}") from None
            if resp.status != 200:
                raise TransportError(f"{addr}: HTTP {resp.status}: {answer[:200]!r}")
        try:
            return self._sealer.open(_REPLIES[purpose], answer, (Sealer.header(body),))
        except AuthError as e:
            raise TransportError(f"{addr}: answer refused: {e}") from None


def refused(error: BaseException) -> bool:
    """Whether a connection was refused: the host is up and nothing listens on the port."""
    if isinstance(error, aiohttp.ClientConnectorError):
        error = error.os_error
    return isinstance(error, ConnectionRefusedError)


def control_routes(node: ControlNode, sealer: Sealer, timings: Timings) -> list[web.RouteDef]:
    refused = 0

    async def opened(request: web.Request, purpose: bytes, limit: int) -> tuple[bytes, bytes]:
        """The request's payload and what its answer is bound to, or a 4xx: too large, cut
        short or too slow, or not sealed for this mesh and this peer."""
        nonlocal refused
        body = await request_body(request, limit, timings.body_timeout)
        try:
            names = names_of(request, node.membership.me.addr)
            return sealer.open(purpose, body, names), Sealer.header(body)
        except AuthError as e:
            refused += 1
            if refused <= 3 or refused % 1000 == 0:
                logger.warning("refused a control request from %s (%d so far): %s",
                               request.remote, refused, e)  # fmt: skip
            raise web.HTTPForbidden(text=f"refused: {e}") from None

    async def handle_control(request: web.Request) -> web.Response:
        payload, bind = await opened(request, CONTROL, MAX_BODY)
        try:
            reply = await node.handle(decode(payload))
        except (WireError, TransportError) as e:
            return web.Response(status=400, text=f"bad control message: {e}")
        body = sealer.seal(CONTROL_REPLY, encode(reply), bind)
        return web.Response(body=body, content_type=CBOR)

    async def handle_echo(request: web.Request) -> web.Response:
        _, bind = await opened(request, PROBE, OVERHEAD + 8)
        return web.Response(body=sealer.seal(PROBE_REPLY, b"", bind))

    async def handle_bulk(request: web.Request) -> web.Response:
        payload, bind = await opened(request, PROBE, OVERHEAD + 8)
        if len(payload) != 8:
            raise web.HTTPBadRequest(text="a bulk probe names its size in 8 bytes")
        size = min(struct.unpack(">Q", payload)[0], MAX_BULK)
        return web.Response(body=sealer.seal(PROBE_REPLY, bytes(size), bind))

    return [
        web.post("/mesh/control", handle_control),
        web.post("/mesh/echo", handle_echo),
        web.post("/mesh/bulk", handle_bulk),
    ]
