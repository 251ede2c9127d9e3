"""The one clock every part of a peer reads and sleeps on, injectable so that tests can run
time at their own pace; and a pulse, so a waiter wakes on change instead of polling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic clock: for timeouts and intervals."""
        ...

    def wall(self) -> float:
        """Seconds since 1970, for what must compare across peers (terms, incarnations)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The event loop's time, and the real wall clock."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Pulse:
    """A change counter that waiters can await: `seen = pulse.version`, look at the state,
    then `await pulse.after(seen)` wakes at the first change since; or, to wake on whichever
    of several things comes first without a task for each, resolve a future of one's own
    (`waking`)."""

    def __init__(self) -> None:
        self.version = 0
        self._waiting: set[asyncio.Future[None]] = set()

    def fire(self) -> None:
        self.version += 1
        waiting, self._waiting = self._waiting, set()
        for future in waiting:
            wake(future)

    async def after(self, seen: int) -> int:
        while self.version == seen:
            woken = asyncio.get_running_loop().create_future()
            with self.waking(woken):
                await woken
        return self.version

    @contextlib.contextmanager
    def waking(self, future: asyncio.Future[None]) -> Iterator[None]:
        """Within: the next change resolves `future`."""
        self._waiting.add(future)
        try:
            yield
        finally:
            self._waiting.discard(future)


def wake(future: asyncio.Future[None]) -> None:
    """Resolve `future` unless something already has."""
    if not future.done():
        future.set_result(None)
