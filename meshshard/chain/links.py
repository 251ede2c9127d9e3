"""Persistent WebSockets to other peers' /chain/ws, one per address, reused by every session,
and the codec every data-plane message goes through (sealed with the mesh key, then CBOR).

Both ends of a socket may send frames; whatever arrives is handed to one dispatcher, so a
stage's error comes back the same way a token does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from meshshard.delays import NONE, Delays
from meshshard.security import DATA, OVERHEAD, AuthError, Sealer
from meshshard.wire import MAX_FRAME_BYTES, DataFrame, WireError, decode_frame, encode_frame

logger = logging.getLogger(__name__)

Dispatch = Callable[[DataFrame], Awaitable[None]]
CONNECT_TIMEOUT = 5.0


class LinkError(Exception):
    pass


@dataclass
class FrameCodec:
    """Frames to sealed bytes and back; anything else is refused with WireError or AuthError."""

    sealer: Sealer
    hidden_size: int | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES
    received_bytes: int = 0

    @property
    def max_message(self) -> int:
        """The largest WebSocket message to read at all (checked before reading it)."""
        return self.max_frame_bytes + OVERHEAD

    def encode(self, frame: DataFrame) -> bytes:
        return self.sealer.seal(DATA, encode_frame(frame))

    def decode(self, data: bytes) -> DataFrame:
        if len(data) > self.max_message:
            raise WireError(f"frame of {len(data)} bytes exceeds {self.max_frame_bytes}")
        self.received_bytes += len(data)
        plain = self.sealer.open(DATA, data)
        return decode_frame(plain, self.hidden_size, self.max_frame_bytes)


class Refusals:
    """Counts refused messages and logs the first few, then one in a thousand."""

    def __init__(self) -> None:
        self.count = 0

    def note(self, source: object, error: Exception) -> None:
        self.count += 1
        if self.count <= 3 or self.count % 1000 == 0:
            logger.warning("refused a frame from %s (%d so far): %s", source, self.count, error)


class Links:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        dispatch: Dispatch,
        tg: asyncio.TaskGroup,
        codec: FrameCodec,
        refusals: Refusals,
        delays: Delays = NONE,
    ) -> None:
        self._session = session
        self._delays = delays
        self._codec = codec
        self._refusals = refusals
        self._dispatch = dispatch
        self._tg = tg
        self._sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.sent_bytes: Counter[str] = Counter()  # per next hop

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr` in order with earlier frames to it; waits while the
        socket's buffers are full (backpressure)."""
        lock = self._locks.setdefault(addr, asyncio.Lock())
        if delay := self._delays.to(addr):
            # A testbed's link delay holds the frame, not the sender: on a real link with
            # that latency the sender is free as soon as the bytes are in the socket (and a
            # frame lost on the way is for the origin to notice). Tasks take the lock in the
            # order they were made, so frames keep their order.
            due = time.monotonic() + delay
            self._tg.create_task(self._send_later(addr, lock, due, frame))
            return
        async with lock:
            await self._write(addr, frame)

    async def _send_later(
        self, addr: str, lock: asyncio.Lock, due: float, frame: DataFrame
    ) -> None:
        async with lock:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await self._write(addr, frame)
            except LinkError as e:
                logger.warning("delayed frame to %s lost: %s", addr, e)

    async def _write(self, addr: str, frame: DataFrame) -> None:
        ws = await self._socket(addr)
        data = self._codec.encode(frame)
        try:
            await ws.send_bytes(data)
            self.sent_bytes[addr] += len(data)
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
                    f"http://{addr}/chain/ws", max_msg_size=self._codec.max_message, heartbeat=10
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise LinkError(f"cannot reach {addr}: {e or type(e).__name__}") from None
        self._sockets[addr] = ws
        self._tg.create_task(self._read(addr, ws))
        return ws

    async def _read(self, addr: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        await read_frames(ws, self._codec, self._refusals, addr, self._dispatch)
        if self._sockets.get(addr) is ws:
            del self._sockets[addr]


async def read_frames(
    ws: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    codec: FrameCodec,
    refusals: Refusals,
    source: str | None,
    dispatch: Dispatch,
) -> None:
    """Hand every frame that arrives on `ws` to `dispatch` until it closes; refuse the rest."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            continue
        try:
            frame = codec.decode(msg.data)
        except (WireError, AuthError) as e:
            refusals.note(source, e)
            continue
        await dispatch(frame)
