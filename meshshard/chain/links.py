"""Persistent WebSockets to other peers' /chain/ws, one per address, reused by every session.

Both ends of a socket may send frames; whatever arrives is handed to one dispatcher, so a
stage's error comes back the same way a token does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from meshshard.wire import MAX_FRAME_BYTES, DataFrame, WireError, decode_frame, encode_frame

logger = logging.getLogger(__name__)

Dispatch = Callable[[DataFrame], Awaitable[None]]
CONNECT_TIMEOUT = 5.0


class LinkError(Exception):
    pass


class Links:
    def __init__(
        self, session: aiohttp.ClientSession, dispatch: Dispatch, tg: asyncio.TaskGroup
    ) -> None:
        self._session = session
        self._dispatch = dispatch
        self._tg = tg
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr` in order with earlier frames to it; waits while the
        socket's buffers are full (backpressure)."""
        lock = self._locks.setdefault(addr, asyncio.Lock())
        async with lock:
            ws = await self._socket(addr)
            try:
                await ws.send_bytes(encode_frame(frame))
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as e:
                self._sockets.pop(addr, None)
                raise LinkError(f"{addr}: {e}") from None

    async def close(self) -> None:
        for ws in list(self._sockets.values()):
            await ws.close()
        self._sockets.clear()

    async def _socket(self, addr: str) -> aiohttp.ClientWebSocketResponse:
        ws = self._sockets.get(addr)
        if ws is not None and not ws.closed:
            return ws
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                ws = await self._session.ws_connect(
                    f"http://{addr}/chain/ws", max_msg_size=MAX_FRAME_BYTES, heartbeat=10
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise LinkError(f"cannot reach {addr}: {e or type(e).__name__}") from None
        self._sockets[addr] = ws
        self._tg.create_task(self._read(addr, ws))
        return ws

    async def _read(self, addr: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                frame = decode_frame(msg.data)
            except WireError as e:
                logger.warning("bad frame from %s: %s", addr, e)
                continue
            await self._dispatch(frame)
        if self._sockets.get(addr) is ws:
            del self._sockets[addr]
