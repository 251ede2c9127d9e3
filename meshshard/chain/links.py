"""Persistent WebSockets to other peers' /chain/ws, two per address (its lanes, lanes.py),
reused by every session, each opened and its frames sealed as channel.py says. Compression
is off (a small compressed message can inflate a thousandfold before any check).

Both ends of a socket may send frames; whatever arrives is handed to one dispatcher, so a
stage's error comes back the same way a token does. Should a socket close under frames it
carried, their answers' origins are told (inflight.py): the frames may be lost unseen. A peer
closes a socket on the first frame or record it refuses (too large for it, malformed, not
opening), so its sender's origins hear of a refused frame the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from meshshard.chain.channel import (
    Channel,
    FrameCodec,
    accept_token,
    open_request,
    sealed_token,
)
from meshshard.chain.inflight import InFlight
from meshshard.chain.lanes import (
    BULK,
    SO_MAX_PACING_RATE,
    STEPS,
    UNPACED,
    fitted,
    lane,
    pace_rate,
)
from meshshard.chain.rawlinks import RawOut
from meshshard.edge.serve import names_of
from meshshard.security import AuthError
from meshshard.wire import (
    MAX_FRAME_LIMIT,
    DataFrame,
    DropFrame,
    ErrorFrame,
    WireError,
)

logger = logging.getLogger(__name__)

Dispatch = Callable[[DataFrame], Awaitable[None]]


class LinkError(Exception):
    pass


class Refusals:
    """Counts refused messages and logs the first few, then one in a thousand."""

    def __init__(self) -> None:
        self.count = 0

    def note(self, source: object, error: Exception) -> None:
        self.count += 1
        if self.count <= 3 or self.count % 1000 == 0:
            logger.warning("refused a frame from %s (%d so far): %s", source, self.count, error)


class LinkWatch(Protocol):
    """Who hears what the links learn of other peers: a link to a peer lost (a socket that
    closed under us, a connection refused), and frames arriving from one; and who knows the
    largest frame each takes (0: unknown)."""

    def unreachable(self, address: str) -> None: ...

    def heard(self, address: str) -> None: ...

    def frame_limit(self, address: str) -> int: ...

    def raw_port(self, address: str) -> int:
        """The port of the peer's raw links (rawlinks.py); 0: it has none."""
        ...

    def link_mbps(self, address: str) -> float:
        """The measured rate of the link to the peer (0: not measured)."""
        ...


class DataLinks(Protocol):
    """Where a peer's data plane sends frames: sockets to other peers (Links), or in tests
    an in-memory network."""

    sent_bytes: Counter[str]  # per next hop

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr`, in order with earlier ones to it; LinkError if it fails."""
        ...

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        """Send one frame to `addr` without waiting, where it can go so; False: nothing was
        sent, `send` it."""
        ...

    def forget(self, session: str) -> None:
        """The answer is over (its drop came): a socket that closes later need not tell its
        origin of its frames."""
        ...

    async def close(self) -> None: ...


_Key = tuple[str, str]  # a socket's address and lane
Socket = aiohttp.ClientWebSocketResponse | RawOut  # the steps socket may be a raw link


class Links:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        dispatch: Dispatch,
        watch: LinkWatch,
        tg: asyncio.TaskGroup,
        codec: FrameCodec,
        refusals: Refusals,
        connect_timeout: float,
    ) -> None:
        self._session = session
        self._watch = watch
        self._closing = False
        self._connect_timeout = connect_timeout
        self._codec = codec
        self._refusals = refusals
        self._dispatch = dispatch
        self._tg = tg
        self._sockets: dict[_Key, tuple[Socket, Channel]] = {}
        self._carried: dict[Socket, InFlight] = {}
        self._paced: dict[Socket, int] = {}  # bytes/s a bulk socket is paced at
        self._locks: dict[_Key, asyncio.Lock] = {}
        self._sending: Counter[_Key] = Counter()  # senders writing or waiting to, per socket
        self._no_raw: set[tuple[str, int]] = set()  # raw links that would not open
        self.sent_bytes: Counter[str] = Counter()  # per next hop

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr` in order with earlier frames of its lane to it; waits
        while that socket's buffers are full (backpressure)."""
        key = (addr, lane(frame))
        most = self._most(addr)
        self._sending[key] += 1
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                for piece in fitted(frame, most):
                    await self._write(key, piece)
        finally:
            self._sending[key] -= 1
        if isinstance(frame, DropFrame):  # its origin ends the answer
            self.forget(frame.session)

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        """`send` without waiting, where the frame's socket is an open raw link with room
        that no sender is writing to; False otherwise (nothing was sent)."""
        key = (addr, lane(frame))
        known = self._sockets.get(key)
        if known is None or self._sending[key]:
            return False
        raw, channel = known
        # A raw link carries the steps lane, none of whose frames `fitted` cuts.
        if not isinstance(raw, RawOut) or not raw.writable:
            return False
        try:
            records = channel.seal(frame)
        except WireError:
            return False  # send() says why
        if (carried := self._carried.get(raw)) is not None:
            carried.sent(addr, frame)
        raw.write(records)
        self.sent_bytes[addr] += sum(len(r) for r in records)
        return True

    def raw(self, addr: str, frame: DataFrame) -> bool:
        """Whether the frame's socket to `addr` is an open raw link (as `send` would find it)."""
        known = self._sockets.get((addr, lane(frame)))
        return known is not None and isinstance(known[0], RawOut) and not known[0].closed

    def _most(self, addr: str) -> int:
        # Cut to the smaller of our limit and the receiver's: a peer set lower refuses more.
        return min(self._codec.max_frame_bytes, self._watch.frame_limit(addr) or MAX_FRAME_LIMIT)

    async def _write(self, key: _Key, frame: DataFrame) -> None:
        addr = key[0]
        ws, channel = await self._socket(key)
        try:
            records = channel.seal(frame)
        except WireError as e:
            raise LinkError(f"{addr}: {e}") from None
        if key[1] == BULK and isinstance(ws, aiohttp.ClientWebSocketResponse):  # never raw
            self._pace(ws, addr)
        if (carried := self._carried.get(ws)) is not None:
            carried.sent(addr, frame)  # before: a close under the write loses it too
        try:
            for record in records:
                await ws.send_bytes(record)
                self.sent_bytes[addr] += len(record)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as e:
            why = closed_why(ws)
            logger.warning("%s socket to %s failed a write: %s (%s)", key[1], addr, e, why)
            self._sockets.pop(key, None)
            self._lost(ws, f"next hop failed: {addr}: {e}")
            self._watch.unreachable(addr)
            raise LinkError(f"{addr}: {e}") from None

    def _pace(self, ws: aiohttp.ClientWebSocketResponse, addr: str) -> None:
        """Pace a bulk socket at PACE_SHARE of the link's measured rate, as measured now
        (unpaced till it is measured, and on loopback)."""
        rate = pace_rate(addr, self._watch.link_mbps(addr))
        if not SO_MAX_PACING_RATE or self._paced.get(ws, 0) == rate:
            return
        self._paced[ws] = rate
        # Once a socket and once a material change in the link's published rate (estimates.py).
        logger.info("prompts to %s paced at %.1f Mbit/s (0: unpaced)", addr, rate * 8 / 1e6)
        sock = ws.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, rate or UNPACED)

    def forget(self, session: str) -> None:
        for carried in self._carried.values():
            carried.forget(session)

    async def close(self) -> None:
        self._closing = True
        for ws, _ in list(self._sockets.values()):
            await ws.close()
        self._sockets.clear()
        self._carried.clear()
        self._paced.clear()

    async def _socket(self, key: _Key) -> tuple[Socket, Channel]:
        addr = key[0]
        known = self._sockets.get(key)
        if known is not None and not known[0].closed:
            return known
        port = self._watch.raw_port(addr) if key[1] == STEPS else 0
        if port and (addr, port) not in self._no_raw:
            raw = await self._raw(key, port)
            if raw is not None:
                return raw
        token, headers = open_request(self._codec.sealer, addr, self._codec.me)
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await self._session.ws_connect(
                    f"http://{addr}/chain/ws",
                    headers=headers,
                    max_msg_size=self._codec.socket_limit,
                    heartbeat=10,
                    compress=0,
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self._watch.unreachable(addr)
            raise LinkError(f"cannot reach {addr}: {e or type(e).__name__}") from None
        channel = self._codec.channel(token, outbound=True)
        self._sockets[key] = (ws, channel)
        self._carried[ws] = InFlight()
        self._tg.create_task(self._read(key, ws, channel))
        return ws, channel

    async def _raw(self, key: _Key, port: int) -> tuple[RawOut, Channel] | None:
        """A raw link to the peer at key's address; None (and WebSockets to it while it
        listens on that port) if it does not open: a firewall may pass the peer's HTTP port
        and not this one."""
        addr = key[0]
        host = addr.rpartition(":")[0].strip("[]")
        token, sealed = sealed_token(self._codec.sealer, addr, self._codec.me)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, raw = await loop.create_connection(RawOut, host, port)
        except (TimeoutError, OSError) as e:
            logger.warning("no raw link to %s (port %d): %s; WebSockets then", addr, port, e)
            self._no_raw.add((addr, port))
            return None
        channel = self._codec.channel(token, outbound=True)
        raw.write([sealed])
        self._sockets[key] = (raw, channel)
        self._carried[raw] = InFlight()
        self._tg.create_task(self._watch_raw(key, raw))
        return raw, channel

    async def _watch_raw(self, key: _Key, raw: RawOut) -> None:
        await raw.ended.wait()
        self._ended(key, raw)

    async def _read(self, key: _Key, ws: aiohttp.ClientWebSocketResponse, channel: Channel) -> None:
        addr = key[0]
        await read_frames(ws, channel, self._refusals, addr, self._dispatch, self._watch.heard)
        self._ended(key, ws)

    def _ended(self, key: _Key, ws: Socket) -> None:
        addr = key[0]
        self._paced.pop(ws, None)
        if (known := self._sockets.get(key)) is not None and known[0] is ws:
            del self._sockets[key]
        if self._closing:
            self._carried.pop(ws, None)
            return
        # Closed under us: the peer left (its record says so), or crashed, whose sockets its
        # kernel closes at once. The control plane tells the two apart.
        why = closed_why(ws)
        logger.info("%s socket to %s closed: %s", key[1], addr, why)
        self._lost(ws, f"the socket to {addr} closed under this answer's frames: {why}")
        self._watch.unreachable(addr)

    def _lost(self, ws: Socket, why: str) -> None:
        """Tell the origin of each answer that `ws` carried that its frames may be lost."""
        carried = self._carried.pop(ws, None)
        errors = carried.lost(why) if carried is not None else []
        if errors:
            logger.warning("telling the origins of %d answers: %s", len(errors), why)
        for origin, error in errors:
            self._tg.create_task(self._tell(origin, error))

    async def _tell(self, origin: str, error: ErrorFrame) -> None:
        try:
            if origin == self._codec.me:
                await self._dispatch(error)
            else:
                await self.send(origin, error)
        except LinkError as e:
            logger.warning("could not tell %s of a lost frame of %s: %s", origin, error.session, e)


def closed_why(ws: Socket | web.WebSocketResponse) -> str:
    """What a peer's log says of a socket that closed: its close code, and the error that
    closed it where one did (a missed heartbeat, a message over the limit)."""
    if isinstance(ws, RawOut):
        return f"raw link, {ws.why}"
    return f"close code {ws.close_code}, {ws.exception() or 'no error'}"


async def read_frames(
    ws: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    channel: Channel,
    refusals: Refusals,
    source: str | None,
    dispatch: Dispatch,
    heard: Callable[[str], None] | None = None,
) -> None:
    """Hand every frame that arrives on `ws` to `dispatch` until it closes, or until a frame
    or record is refused: that closes the socket. `heard(source)` is told of each frame from
    a peer whose address we know."""
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            continue
        try:
            frame = channel.open(msg.data)
        except (WireError, AuthError) as e:
            refusals.note(source, e)
            # Its sender cannot tell a refused frame from a delivered one, and the answer it
            # carried would wait out its step timeout. A socket closing under frames it can
            # tell: their origins hear of it and feed the answers again (inflight.py).
            why = f"refused: {e}".encode("ascii", "replace")[:120]
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=why)
            return
        if frame is not None:
            if heard is not None and source:
                heard(source)
            # No yield between frames already read: the steps of one wave reach a stage
            # before its worker takes a batch (frames set off work, not do it).
            await dispatch(frame)


class SocketServer:
    """The accepting side of data-plane sockets (`GET /chain/ws`): opens one only for an
    upgrade sealed for this peer, then hands every frame that arrives to `dispatch`."""

    def __init__(
        self,
        codec: FrameCodec,
        refusals: Refusals,
        address: Callable[[], str],
        dispatch: Dispatch,
        watch: LinkWatch,
    ) -> None:
        self._codec, self._refusals, self._address = codec, refusals, address
        self._dispatch, self._watch = dispatch, watch
        self._inbound: set[web.WebSocketResponse] = set()
        self._closing = False

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        token, sender = accept_token(
            request, self._codec.sealer, names_of(request, self._address())
        )
        # A peer whose socket to us we closed opens another at once, to tell us of frames
        # the first carried: open, it held our exit until its heartbeat failed (~16 s).
        if self._closing:
            raise web.HTTPServiceUnavailable(text="this peer is leaving the mesh")
        ws = web.WebSocketResponse(
            max_msg_size=self._codec.socket_limit, heartbeat=10, compress=False
        )
        await ws.prepare(request)
        if self._closing:  # closed while the upgrade was answered
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            return ws
        self._inbound.add(ws)
        channel = self._codec.channel(token, outbound=False)
        try:
            await read_frames(
                ws, channel, self._refusals, sender or request.remote, self._dispatch,
                self._watch.heard if sender else None,
            )  # fmt: skip
        finally:
            self._inbound.discard(ws)
        logger.info("socket from %s closed: %s", sender or request.remote, closed_why(ws))
        return ws

    async def close(self) -> None:
        """Close every socket open to us (the HTTP server waits for them to end), and open no
        more."""
        self._closing = True
        for ws in list(self._inbound):
            await ws.close()
