"""Persistent WebSockets to other peers' /chain/ws, two per address (below), reused by
every session, and the sealing every data-plane message goes through.

A socket opens only for a peer of the mesh: the upgrade request carries a connection token
sealed for the address it is sent to, and without one it is refused (401, 403) before the
socket exists. Frames then travel as sealed records of at most RECORD_BYTES, bound to that
connection and direction, so no one without the key makes a peer buffer more than one record,
and a record cannot be replayed on another socket. Compression is off (a small compressed
message can inflate a thousandfold before any check).

Both ends of a socket may send frames; whatever arrives is handed to one dispatcher, so a
stage's error comes back the same way a token does. Should a socket close under frames it
carried, their answers' origins are told (inflight.py): the frames may be lost unseen. A peer
closes a socket on the first frame or record it refuses (too large for it, malformed, not
opening), so its sender's origins hear of a refused frame the same way.

Two sockets go to each peer: one for bulk (a prompt's activations, a feed after a replay, a
handed-off cache, a session's drop) and one for the rest (decode steps, tokens, errors). On
one socket a step's few kilobytes would wait behind every byte of a prompt sent before it:
on a 20 Mbit/s link a 2,000-token prompt holds the socket for about 2 s, and every answer
decoding through that link would stall as long. A session's frames cannot overtake each
other across the two: its next step is sent only once its prompt has come round the chain
as a token, and its drop goes behind its prompt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import secrets
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import aiohttp
from aiohttp import web

from meshshard.chain.inflight import InFlight
from meshshard.chain.tensors import positions, rows
from meshshard.edge.serve import names_of
from meshshard.security import CHANNEL, DATA, OVERHEAD, AuthError, Sealer
from meshshard.wire import (
    MAX_FRAME_BYTES,
    MAX_FRAME_LIMIT,
    DataFrame,
    DropFrame,
    ErrorFrame,
    KVFrame,
    StepFrame,
    WireError,
    decode_frame,
    encode_frame,
)

logger = logging.getLogger(__name__)

Dispatch = Callable[[DataFrame], Awaitable[None]]
RECORD_BYTES = 1 << 20  # the most of a frame one sealed record carries
CHANNEL_HEADER = "X-MeshShard-Channel"
TOKEN_BYTES = 16
MAX_ADDRESS = 255  # bytes of the sender's address an upgrade may name
_MORE, _LAST = b"\x00", b"\x01"
_NUMBER = 8  # bytes of a record's frame number
_HEADER_ROOM = 4096  # more than a step's fields take encoded, beside its tensor


class LinkError(Exception):
    pass


@dataclass
class FrameCodec:
    """Frames to plain bytes and back, and the limits of a data-plane socket."""

    sealer: Sealer
    hidden_size: int | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES
    received_bytes: int = 0
    # This peer's address, named in the upgrades it sends: the other side then knows whose
    # frames arrive on the socket (evidence that we are alive).
    me: str = ""

    @property
    def record_bytes(self) -> int:
        return min(RECORD_BYTES, self.max_frame_bytes)

    @property
    def max_message(self) -> int:
        """The largest WebSocket message to read at all (checked before reading it)."""
        return self.record_bytes + 1 + _NUMBER + OVERHEAD

    @property
    def socket_limit(self) -> int:
        """aiohttp's max_msg_size for a data-plane socket: one more than the largest record,
        as aiohttp refuses a message of exactly its limit (a full record then closed the
        socket with 1009, and the frame was lost, under a long prompt's rows)."""
        return self.max_message + 1

    def channel(self, token: bytes, outbound: bool) -> Channel:
        return Channel(self, token, outbound)

    def decode(self, plain: bytes) -> DataFrame:
        return decode_frame(plain, self.hidden_size, self.max_frame_bytes)


@dataclass
class Channel:
    """One socket's sealing: a frame goes out as records bound to this connection and our
    direction, each `more or last (1) | frame number (8) | piece`; records coming in are opened
    and joined into frames. A record that does not open is refused alone (it cannot belong to
    any frame); a frame past the size limit is refused as soon as it is, and its later records
    are skipped."""

    codec: FrameCodec
    token: bytes
    outbound: bool
    _sent: int = 0
    _frame: int = -1  # the number of the frame arriving
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0
    _skipping: bool = False

    def seal(self, frame: DataFrame) -> list[bytes]:
        plain = encode_frame(frame)
        if len(plain) > self.codec.max_frame_bytes:
            raise WireError(f"frame of {len(plain)} bytes exceeds {self.codec.max_frame_bytes}")
        step = self.codec.record_bytes
        bind = self._bind(self.outbound)
        number = struct.pack(">Q", self._sent)
        self._sent += 1
        pieces = [plain[i : i + step] for i in range(0, len(plain), step)] or [b""]
        return [
            self.codec.sealer.seal(
                DATA, (_LAST if i == len(pieces) - 1 else _MORE) + number + piece, bind
            )
            for i, piece in enumerate(pieces)
        ]

    def open(self, data: bytes) -> DataFrame | None:
        """The frame this record completes; None while more records are to come, or for a
        record of a refused frame; WireError or AuthError for a record or frame to refuse."""
        if len(data) > self.codec.max_message:
            raise WireError(f"record of {len(data)} bytes exceeds {self.codec.max_message}")
        self.codec.received_bytes += len(data)
        plain = self.codec.sealer.open(DATA, data, (self._bind(not self.outbound),))
        if len(plain) < 1 + _NUMBER or plain[:1] not in (_MORE, _LAST):
            raise WireError("a record starts with its more/last flag and frame number")
        last, number = plain[:1] == _LAST, struct.unpack(">Q", plain[1 : 1 + _NUMBER])[0]
        if number != self._frame:  # a new frame; the sender abandoned any before it
            self._frame, self._parts, self._size, self._skipping = number, [], 0, False
        if self._skipping:
            return None
        self._size += len(plain) - 1 - _NUMBER
        if self._size > self.codec.max_frame_bytes:
            self._parts, self._skipping = [], True
            raise WireError(f"frame exceeds {self.codec.max_frame_bytes} bytes")
        self._parts.append(plain[1 + _NUMBER :])
        if not last:
            return None
        whole, self._parts = b"".join(self._parts), []
        return self.codec.decode(whole)

    def _bind(self, outbound: bool) -> bytes:
        return self.token + (b">" if outbound else b"<")


def open_request(sealer: Sealer, addr: str, me: str = "") -> tuple[bytes, dict[str, str]]:
    """A new connection token, and the upgrade header that carries it sealed for `addr`,
    with the sender's address `me`."""
    token = secrets.token_bytes(TOKEN_BYTES)
    sealed = sealer.seal(CHANNEL, token + me.encode(), addr.encode())
    return token, {CHANNEL_HEADER: base64.b64encode(sealed).decode()}


def accept_token(request: web.Request, sealer: Sealer, names: Sequence[bytes]) -> tuple[bytes, str]:
    """The connection token of an upgrade request sealed for one of `names`, and the
    sender's address; 401 without one and 403 for one that does not open, before any
    socket exists."""
    raw = request.headers.get(CHANNEL_HEADER)
    if raw is None:
        raise web.HTTPUnauthorized(text=f"a data-plane socket needs a sealed {CHANNEL_HEADER}")
    try:
        plain = sealer.open(CHANNEL, base64.b64decode(raw, validate=True), names)
        sender = plain[TOKEN_BYTES:].decode()
    except (binascii.Error, AuthError, UnicodeDecodeError) as e:
        raise web.HTTPForbidden(text=f"refused: {e}") from None
    if len(plain) < TOKEN_BYTES or len(sender) > MAX_ADDRESS:
        raise web.HTTPForbidden(text="refused: a connection token is 16 bytes and an address")
    return plain[:TOKEN_BYTES], sender


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


class DataLinks(Protocol):
    """Where a peer's data plane sends frames: sockets to other peers (Links), or in tests
    an in-memory network."""

    sent_bytes: Counter[str]  # per next hop

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr`, in order with earlier ones to it; LinkError if it fails."""
        ...

    def forget(self, session: str) -> None:
        """The answer is over (its drop came): a socket that closes later need not tell its
        origin of its frames."""
        ...

    async def close(self) -> None: ...


BULK, STEPS = "bulk", "steps"  # a link's two sockets
_Key = tuple[str, str]  # a socket's address and lane


def lane(frame: DataFrame) -> str:
    """The socket a frame goes by: bulk for a prompt's (or feed's) rows and handed-off caches,
    and for a session's drop, which must not overtake its prompt (the stage would then start
    the session after forgetting it, and hold its cache until it idles out)."""
    if isinstance(frame, KVFrame | DropFrame):
        return BULK
    if isinstance(frame, StepFrame) and frame.tensor.shape[0] - len(frame.draft) > 1:
        return BULK
    return STEPS


def fitted(frame: DataFrame, most: int) -> list[DataFrame]:
    """`frame` as frames of at most `most` bytes encoded. A step of many rows (a long
    prompt's activations on a large model, or under a low --max-frame) goes as steps of
    consecutive rows, which the next stage joins again; only the last samples, drafts and
    feeds the chain on, as a stage's slices do (the rows it samples stay together in it). A
    layer's handed-off cache goes as pieces of consecutive positions, each appended to the
    last; only the last piece of the last layer is `final`. Anything else, or what cannot be
    cut to fit, goes whole (and is refused whole)."""
    match frame:
        case StepFrame() if len(frame.tensor.data) + _HEADER_ROOM > most:
            total = frame.tensor.shape[0]
            no_rows = replace(frame, tensor=rows(frame.tensor, 0, 0))
            per = _per_piece(no_rows, len(frame.tensor.data), total, most)
            last = max(len(frame.draft) + 1, per)
            if per < 1 or last >= total:
                return [frame]
            head = replace(frame, sample=False, draft=())
            cuts = [*range(0, total - last, per), total - last, total]
            return [
                replace(
                    head if b < total else frame,
                    start=frame.start + a,
                    tensor=rows(frame.tensor, a, b),
                )
                for a, b in itertools.pairwise(cuts)
            ]
        case KVFrame() if len(frame.keys.data) + len(frame.values.data) + _HEADER_ROOM > most:
            total = frame.keys.shape[2]
            none_held = replace(
                frame, keys=positions(frame.keys, 0, 0), values=positions(frame.values, 0, 0)
            )
            size = len(frame.keys.data) + len(frame.values.data)
            per = _per_piece(none_held, size, total, most)
            if per < 1 or per >= total:
                return [frame]
            return [
                replace(
                    frame,
                    start=frame.start + a,
                    keys=positions(frame.keys, a, b),
                    values=positions(frame.values, a, b),
                    final=frame.final and b == total,
                )
                for a, b in itertools.pairwise([*range(0, total, per), total])
            ]
    return [frame]


def _per_piece(empty: DataFrame, size: int, count: int, most: int) -> int:
    """How many of `count` rows or positions (`size` bytes together) fit in a frame of `most`
    bytes beside the fields of `empty`, the frame with none."""
    each = size // count if count else 0
    return (most - len(encode_frame(empty)) - 16) // each if each else 0


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
        self._sockets: dict[_Key, tuple[aiohttp.ClientWebSocketResponse, Channel]] = {}
        self._carried: dict[aiohttp.ClientWebSocketResponse, InFlight] = {}
        self._locks: dict[_Key, asyncio.Lock] = {}
        self.sent_bytes: Counter[str] = Counter()  # per next hop

    async def send(self, addr: str, frame: DataFrame) -> None:
        """Send one frame to `addr` in order with earlier frames of its lane to it; waits
        while that socket's buffers are full (backpressure)."""
        key = (addr, lane(frame))
        # Cut to the smaller of our limit and the receiver's: a peer set lower refuses more.
        most = min(self._codec.max_frame_bytes, self._watch.frame_limit(addr) or MAX_FRAME_LIMIT)
        async with self._locks.setdefault(key, asyncio.Lock()):
            for piece in fitted(frame, most):
                await self._write(key, piece)
        if isinstance(frame, DropFrame):  # its origin ends the answer
            self.forget(frame.session)

    async def _write(self, key: _Key, frame: DataFrame) -> None:
        addr = key[0]
        ws, channel = await self._socket(key)
        try:
            records = channel.seal(frame)
        except WireError as e:
            raise LinkError(f"{addr}: {e}") from None
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

    def forget(self, session: str) -> None:
        for carried in self._carried.values():
            carried.forget(session)

    async def close(self) -> None:
        self._closing = True
        for ws, _ in list(self._sockets.values()):
            await ws.close()
        self._sockets.clear()
        self._carried.clear()

    async def _socket(self, key: _Key) -> tuple[aiohttp.ClientWebSocketResponse, Channel]:
        addr = key[0]
        known = self._sockets.get(key)
        if known is not None and not known[0].closed:
            return known
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

    async def _read(self, key: _Key, ws: aiohttp.ClientWebSocketResponse, channel: Channel) -> None:
        addr = key[0]
        await read_frames(ws, channel, self._refusals, addr, self._dispatch, self._watch.heard)
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

    def _lost(self, ws: aiohttp.ClientWebSocketResponse, why: str) -> None:
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


def closed_why(ws: aiohttp.ClientWebSocketResponse | web.WebSocketResponse) -> str:
    """What a peer's log says of a socket that closed: its close code, and the error that
    closed it where one did (a missed heartbeat, a message over the limit)."""
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
