"""Raw links: a plain TCP connection per link for what links.py's steps socket carries (decode
steps, tokens, picks, errors), read by the protocol's callback instead of a task.

A lone answer's token crosses four frames a step, each on the critical path. By WebSocket a
frame passes aiohttp's reader, a reading task's wake, the stage's queue and its compute task's
wake before its pass starts, and an outbox and a sender task after: 1.2-2.5 ms a hop on the
2-core test host, cold after a pass (docs/experiments/hops.txt), where a ring of bare
processes on pipes spends a fraction of that. Here a frame is opened in the callback that
reads it and handed to `dispatch_now` (ChainService.handle_now), which runs a short pass of
an idle stage at once and writes its output with `RawOut.write`; whatever cannot go at once
goes to the same dispatcher the sockets use, in order, by a task.

A connection opens as a WebSocket does (channel.py): its first record is a connection token
sealed for the address it reaches, within the connect timeout, or it closes before a frame is
read. Then sealed records of at most the codec's limit, each behind its 4-byte length: a
length over the limit, or a record that does not open, closes it. One direction only: the
opener writes, the listener reads. The listener's port is in the peer's profile (`raw`); a
peer without one gets WebSockets only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from meshshard.chain.channel import Channel, FrameCodec, opened_token
from meshshard.errors import MeshShardError
from meshshard.security import AuthError
from meshshard.wire import DataFrame, StepFrame, WireError

logger = logging.getLogger(__name__)

LENGTH = struct.Struct(">I")
HELLO_BYTES = 1024  # more than a sealed token and the longest address it may name
BACKLOG = 64  # frames read and waiting for the dispatcher before reading pauses
KEEPALIVE = (10, 2, 3)  # idle seconds, seconds between probes, probes: a vanished peer's
# connection closes in about 16 s, as a WebSocket's missed heartbeat closes it; and as long
# for bytes written and not acknowledged (TCP_USER_TIMEOUT), which keepalive does not cover
UNACKED_MS = 16_000

# (frame, more): `more` where a step follows it in what one read brought, which it then waits
# for rather than running alone at once (a wave's frames come back to back).
DispatchNow = Callable[[DataFrame, bool], bool]
Dispatch = Callable[[DataFrame], Awaitable[None]]


def listening(host: str, port: int) -> socket.socket:
    """The raw links' listening socket on host:port (0: any free port), or a one-line
    MeshShardError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise MeshShardError(f"port {port} (raw links) is in use on {host}") from None
        raise MeshShardError(f"cannot listen on {host}:{port} (raw links): {e.strerror}") from None


def _keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKED_MS)


class RawOut(asyncio.Protocol):
    """The writing end of a raw link (links.py opens it and seals what it writes)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.ended = asyncio.Event()
        self.why = "closed"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        _keepalive(transport)

    def data_received(self, data: bytes) -> None:
        self.why = "the listener wrote to a one-way link"
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.why = str(exc) or type(exc).__name__
        self._writable.set()
        self.ended.set()

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing() or self.ended.is_set()

    @property
    def writable(self) -> bool:
        """Open, with room in its buffers."""
        return not self.closed and self._writable.is_set()

    def write(self, records: list[bytes]) -> None:
        """Each record behind its length, into the socket's buffers; ConnectionError if closed."""
        if self.closed:
            raise ConnectionError(f"raw link closed: {self.why}")
        assert self._transport is not None
        self._transport.write(b"".join(LENGTH.pack(len(r)) + r for r in records))

    async def send_bytes(self, record: bytes) -> None:
        """`write` one record, then wait while the buffers are full (backpressure)."""
        self.write([record])
        await self._writable.wait()

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.ended.wait()


class RawListener:
    """Accepts raw links on a bound socket and hands their frames on: to `dispatch_now`
    first, from the reading callback; where it declines, or frames wait before it, to
    `dispatch` by a task, in order."""

    def __init__(
        self,
        sock: socket.socket,
        codec: FrameCodec,
        address: Callable[[], str],
        dispatch: Dispatch,
        dispatch_now: DispatchNow,
        heard: Callable[[str], None],
        note_refused: Callable[[object, Exception], None],
        admit: Callable[[object, str], bool],
        release: Callable[[object], None],
        hello_timeout: float,
        wrap: Callable[[asyncio.Protocol], asyncio.Protocol] = lambda link: link,
    ) -> None:
        """wrap: what each link's reading protocol is served through (a testbed's link
        delay, delays.py)."""
        self._sock, self.codec, self.address = sock, codec, address
        self._wrap = wrap
        self.dispatch, self.dispatch_now, self.heard = dispatch, dispatch_now, heard
        self.note_refused, self.admit, self.release = note_refused, admit, release
        self.hello_timeout = hello_timeout
        self.port: int = sock.getsockname()[1]
        self._open: set[RawIn] = set()
        self._tg: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Serve until cancelled; then accept no more and close every raw link open to us."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self._wrap(RawIn(self)), sock=self._sock)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await asyncio.Event().wait()
        finally:
            self._tg = None
            server.close()
            for link in list(self._open):
                link.close()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """A task of this listener's (its links' dispatchers), cancelled when it stops."""
        if self._tg is None:
            work.close()
            return None
        return self._tg.create_task(work)

    def opened(self, link: RawIn) -> None:
        self._open.add(link)

    def ended(self, link: RawIn) -> None:
        self._open.discard(link)
        self.release(link)


class RawIn(asyncio.Protocol):
    """The reading end of one raw link."""

    def __init__(self, listener: RawListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._channel: Channel | None = None
        self._sender = ""
        self._source: object = None
        self._timer: asyncio.TimerHandle | None = None
        self._backlog: deque[DataFrame] = deque()
        self._draining: asyncio.Task[None] | None = None
        self._paused = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._source = peer[0] if peer else "unknown"
        if not self._listener.admit(self, str(self._source)):
            self._closed = True
            transport.abort()
            return
        self._listener.opened(self)
        _keepalive(transport)
        loop = asyncio.get_running_loop()
        why = WireError("no connection token in time")
        self._timer = loop.call_later(self._listener.hello_timeout, self._refuse, why)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._listener.ended(self)

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _refuse(self, error: Exception) -> None:
        self._listener.note_refused(self._sender or self._source, error)
        self.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        frames: list[DataFrame] = []
        while not self._closed and len(self._buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self._buffer)
            most = HELLO_BYTES if self._channel is None else self._listener.codec.max_message
            if size > most:
                self._refuse(WireError(f"record of {size} bytes exceeds {most}"))
                break
            end = LENGTH.size + size
            if len(self._buffer) < end:
                break
            record = bytes(self._buffer[LENGTH.size : end])
            del self._buffer[:end]
            if self._channel is None:
                self._hello(record)
            elif (frame := self._open(self._channel, record)) is not None:
                frames.append(frame)
        # All that came is opened before any of it runs: a wave's steps read together are
        # queued together, rather than the first run alone on the loop with the others unread
        # (the stages after then held each for the others, and the wave stayed split).
        steps = sum(isinstance(f, StepFrame) for f in frames)
        for frame in frames:
            steps -= isinstance(frame, StepFrame)
            self._take(frame, more=steps > 0)

    def _hello(self, record: bytes) -> None:
        listener = self._listener
        try:
            token, sender = opened_token(
                listener.codec.sealer, record, (listener.address().encode(),)
            )
        except AuthError as e:
            self._refuse(e)
            return
        if self._timer is not None:
            self._timer.cancel()
        self._channel = listener.codec.channel(token, outbound=False)
        self._sender = sender

    def _open(self, channel: Channel, record: bytes) -> DataFrame | None:
        try:
            return channel.open(record)
        except (WireError, AuthError) as e:
            self._refuse(e)
            return None

    def _take(self, frame: DataFrame, more: bool) -> None:
        taken = False
        if not self._backlog:  # frames behind one that waits wait behind it
            try:
                taken = self._listener.dispatch_now(frame, more)
            except Exception:  # a bug must cost this frame, not the peer
                logger.exception("a frame from %s failed", self._sender or self._source)
                taken = True
        if self._sender:  # after: a step's pass may have run, and the chain waits for it
            self._listener.heard(self._sender)
        if taken:
            return
        self._backlog.append(frame)
        if self._draining is None:
            self._draining = self._listener.spawn(self._drain())
        if len(self._backlog) >= BACKLOG and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    async def _drain(self) -> None:
        try:
            while self._backlog:
                try:
                    await self._listener.dispatch(self._backlog[0])
                except Exception:
                    logger.exception("a frame from %s failed", self._sender or self._source)
                self._backlog.popleft()
                if self._paused and len(self._backlog) < BACKLOG // 2 and not self._closed:
                    self._paused = False
                    assert self._transport is not None
                    self._transport.resume_reading()
        finally:
            self._draining = None
