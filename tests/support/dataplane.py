"""Playing a peer on the data plane in a test: open an authenticated socket to a stage's
/chain/ws, and serve /chain/ws as an origin that collects the frames sent back to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from meshshard.chain.channel import Channel, FrameCodec, accept_token, open_request
from meshshard.wire import DataFrame


@asynccontextmanager
async def channel_to(
    addr: str, codec: FrameCodec
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, Channel]]:
    """A socket to `addr`'s /chain/ws opened as a peer of the mesh opens it."""
    token, headers = open_request(codec.sealer, addr)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://{addr}/chain/ws", headers=headers, max_msg_size=0) as ws,
    ):
        yield ws, codec.channel(token, outbound=True)


@asynccontextmanager
async def origin_at(
    port: int, codec: FrameCodec, on_frame: Callable[[DataFrame], None]
) -> AsyncIterator[str]:
    """Serve /chain/ws on 127.0.0.1:`port` as a peer does; every frame that arrives goes to
    `on_frame`. Yields the address."""
    addr = f"127.0.0.1:{port}"

    async def handle(request: web.Request) -> web.WebSocketResponse:
        token, _ = accept_token(request, codec.sealer, (addr.encode(),))
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        channel = codec.channel(token, outbound=False)
        async for msg in ws:
            if (frame := channel.open(msg.data)) is not None:
                on_frame(frame)
        return ws

    app = web.Application()
    app.add_routes([web.get("/chain/ws", handle)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield addr
    finally:
        await runner.cleanup()


class Unwatched:
    """A LinkWatch that listens to nothing: links in a test without a control plane (a link
    measured at `mbps`, 0: not measured)."""

    def __init__(self, mbps: float = 0.0) -> None:
        self.mbps = mbps

    def unreachable(self, address: str) -> None:
        pass

    def frame_limit(self, address: str) -> int:
        return 0

    def raw_port(self, address: str) -> int:
        return 0

    def link_mbps(self, address: str) -> float:
        return self.mbps

    def heard(self, address: str) -> None:
        pass


async def ignore(frame: DataFrame) -> None:
    """A dispatcher for frames a test does not look at."""
