"""Test-only link delay for the namespace testbed, whose kernel has no netem.

`MESHSHARD_TEST_DELAYS="self=5,10.232.7.2=0.5,..."` gives this peer's one-way delay to the
bridge and every other host's, in milliseconds. A message then waits the sender's delay plus
the receiver's before it is sent, in order and without holding up the messages behind it or
its sender, so a link behaves like one with that latency. A host not in the table (this peer
itself) is reached without a link, so without delay. Unset (real use), nothing waits.

The delays wrap the transports from outside, where the testbed asks for them: requests of an
HTTP client (`request_delays`), answers of a server (`answer_delays`), data-plane frames
(`DelayedLinks`), and what a raw link's reader reads (`LateReading`: a frame written to a raw
link leaves at once, as on a real link, and its reader takes it the delay late); the
transports themselves know nothing of them. Every wait is kept by a thread (`Alarms`): the
event loop's timers round up to whole milliseconds, five times a LAN's delay.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from meshshard.chain.lanes import lane
from meshshard.chain.links import LinkError, Links
from meshshard.wire import DataFrame

logger = logging.getLogger(__name__)

ENV = "MESHSHARD_TEST_DELAYS"


@dataclass(frozen=True)
class Delays:
    own_ms: float = 0.0
    hosts_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Delays:
        text = os.environ.get(ENV, "").strip()
        if not text:
            return cls()
        table = {}
        for item in text.split(","):
            host, _, ms = item.partition("=")
            table[host.strip()] = float(ms)
        own = table.pop("self", 0.0)
        return cls(own, table)

    def __bool__(self) -> bool:
        """Whether any delay is in force (only on a testbed)."""
        return bool(self.own_ms or self.hosts_ms)

    def to(self, addr: str | None) -> float:
        """Seconds a message to `addr` (host or host:port) waits before it leaves."""
        if not self.own_ms and not self.hosts_ms:
            return 0.0
        host = (addr or "").rsplit(":", 1)[0]
        if host not in self.hosts_ms:
            return 0.0
        return (self.own_ms + self.hosts_ms[host]) / 1000


NONE = Delays()


class Alarms:
    """Callbacks on the event loop after sub-millisecond waits, which the loop's own timers
    do not keep: its poll waits whole milliseconds, rounded up, so a 0.2 ms delay would hold
    a frame 1 ms or more whenever nothing else wakes the loop. A thread sleeps until each
    is due (condition waits keep microseconds) and hands it to the loop; alarms fire in the
    order they are due, those due together in the order they were set."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._set = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def after(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="delays", daemon=True)
            self._thread.start()
        with self._wake:
            heapq.heappush(self._due, (time.monotonic() + seconds, next(self._set), callback))
            self._wake.notify()

    def ready_in(self, seconds: float) -> asyncio.Future[None]:
        """A future done `seconds` from now."""
        ready = asyncio.get_running_loop().create_future()
        self.after(seconds, functools.partial(_settle, ready))
        return ready

    def _run(self) -> None:
        assert self._loop is not None
        while True:
            with self._wake:
                while not self._closed and (
                    not self._due or (wait := self._due[0][0] - time.monotonic()) > 0
                ):
                    self._wake.wait(wait if self._due else None)
                if self._closed:
                    return
                _, _, callback = heapq.heappop(self._due)
            self._loop.call_soon_threadsafe(callback)

    def close(self) -> None:
        """Stop: alarms not yet due never fire."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()


def request_delays(delays: Delays, alarms: Alarms) -> aiohttp.TraceConfig:
    """For an HTTP client: every request waits the link's delay before it leaves."""
    trace = aiohttp.TraceConfig()

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if wait := delays.to(f"{params.url.host}:{params.url.port}"):
            await alarms.ready_in(wait)

    trace.on_request_start.append(on_start)
    return trace


def answer_delays(delays: Delays, alarms: Alarms) -> Any:
    """For a server: answers wait the link's delay back to the asker, as requests do."""

    @web.middleware
    async def delay(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if wait := delays.to(request.remote):
            await alarms.ready_in(wait)
        return response

    return delay


class LateReading(asyncio.Protocol):
    """A raw link's reading protocol (rawlinks.RawIn) served its bytes the link's delay after
    they arrive, in order, and its end after them. The delay is the reader's to keep: the
    writer's bytes leave at once, as on a real link, whatever its event loop does next (a
    pick of the head, say, which would hold a frame waiting there for the loop)."""

    def __init__(self, inner: asyncio.Protocol, delays: Delays, alarms: Alarms) -> None:
        self._inner, self._delays, self._alarms = inner, delays, alarms
        self._delay = 0.0
        self._due = 0  # chunks read and still on their way
        self._lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._delay = self._delays.to(peer[0]) if peer else 0.0
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._delay:
            self._inner.data_received(data)
            return
        self._due += 1
        self._alarms.after(self._delay, functools.partial(self._arrived, data))

    def _arrived(self, data: bytes) -> None:
        self._due -= 1
        self._inner.data_received(data)
        if not self._due and self._lost:
            self._inner.connection_lost(self._lost[0])

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._due:
            self._lost.append(exc)  # after the bytes still on their way
            return
        self._inner.connection_lost(exc)


class DelayedLinks:
    """Data-plane links whose frames wait the link's delay. The delay holds the frame, not
    the sender: on a real link with that latency the sender is free as soon as the bytes are
    in the socket (and a frame lost on the way is for the origin to notice). Frames to one
    address keep their order within their lane (lanes.py): a step does not wait here behind
    a prompt's activations any more than on the sockets. A frame whose socket is a raw link
    goes at once, as undelayed: its reader holds it (`LateReading`). (A frame that opens a
    raw link waits here, then there too: once a link.)"""

    def __init__(self, inner: Links, delays: Delays, tg: asyncio.TaskGroup, alarms: Alarms) -> None:
        self._inner, self._delays, self._tg, self._alarms = inner, delays, tg, alarms
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._held: Counter[tuple[str, str]] = Counter()  # frames waiting here, by socket
        self.sent_bytes: Counter[str] = inner.sent_bytes

    async def send(self, addr: str, frame: DataFrame) -> None:
        key, delay = (addr, lane(frame)), self._delays.to(addr)
        if not delay or (self._inner.raw(addr, frame) and not self._held[key]):
            await self._inner.send(addr, frame)
            return
        ready = self._alarms.ready_in(delay)
        self._held[key] += 1
        self._tg.create_task(self._later(key, ready, frame))

    async def _later(
        self, key: tuple[str, str], ready: asyncio.Future[None], frame: DataFrame
    ) -> None:
        # Tasks take the lock in the order they were made, so frames keep their order.
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                await ready
                await self._inner.send(key[0], frame)
        except LinkError as e:
            logger.warning("delayed frame to %s lost: %s", key[0], e)
        finally:
            self._held[key] -= 1

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        # Only a raw link takes a frame at once, and its reader holds it; never past one here.
        return not self._held[(addr, lane(frame))] and self._inner.send_now(addr, frame)

    def forget(self, session: str) -> None:
        self._inner.forget(session)

    async def close(self) -> None:
        await self._inner.close()


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
