"""Test-only link delay for the namespace testbed, whose kernel has no netem.

`MESHSHARD_TEST_DELAYS="self=5,10.232.7.2=0.5,..."` gives this peer's one-way delay to the
bridge and every other host's, in milliseconds. A message then waits the sender's delay plus
the receiver's before it is sent, in order and without holding up the messages behind it or
its sender, so a link behaves like one with that latency. A host not in the table (this peer
itself) is reached without a link, so without delay. Unset (real use), nothing waits.

The delays wrap the transports from outside, where the testbed asks for them: requests of an
HTTP client (`request_delays`), answers of a server (`answer_delays`) and data-plane frames
(`DelayedLinks`); the transports themselves know nothing of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from meshshard.chain.links import DataLinks, LinkError, lane
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


def request_delays(delays: Delays) -> aiohttp.TraceConfig:
    """For an HTTP client: every request waits the link's delay before it leaves."""
    trace = aiohttp.TraceConfig()

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        if wait := delays.to(f"{params.url.host}:{params.url.port}"):
            await asyncio.sleep(wait)

    trace.on_request_start.append(on_start)
    return trace


def answer_delays(delays: Delays) -> Any:
    """For a server: answers wait the link's delay back to the asker, as requests do."""

    @web.middleware
    async def delay(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if wait := delays.to(request.remote):
            await asyncio.sleep(wait)
        return response

    return delay


class DelayedLinks:
    """Data-plane links whose frames wait the link's delay. The delay holds the frame, not
    the sender: on a real link with that latency the sender is free as soon as the bytes are
    in the socket (and a frame lost on the way is for the origin to notice). Frames to one
    address keep their order within their lane (links.py): a step does not wait here behind
    a prompt's activations any more than on the sockets."""

    def __init__(self, inner: DataLinks, delays: Delays, tg: asyncio.TaskGroup) -> None:
        self._inner, self._delays, self._tg = inner, delays, tg
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.sent_bytes: Counter[str] = inner.sent_bytes

    async def send(self, addr: str, frame: DataFrame) -> None:
        delay = self._delays.to(addr)
        if not delay:
            await self._inner.send(addr, frame)
            return
        # Tasks take the lock in the order they were made, so frames keep their order.
        due = asyncio.get_running_loop().time() + delay
        self._tg.create_task(self._later(addr, due, frame))

    async def _later(self, addr: str, due: float, frame: DataFrame) -> None:
        async with self._locks.setdefault((addr, lane(frame)), asyncio.Lock()):
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            try:
                await self._inner.send(addr, frame)
            except LinkError as e:
                logger.warning("delayed frame to %s lost: %s", addr, e)

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        return not self._delays.to(addr) and self._inner.send_now(addr, frame)

    def forget(self, session: str) -> None:
        self._inner.forget(session)

    async def close(self) -> None:
        await self._inner.close()
