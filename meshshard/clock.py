"""The one clock every part of a peer reads and sleeps on, injectable so that tests can run
time at their own pace; and a pulse, so a waiter wakes on change instead of polling."""

from __future__ import annotations

import asyncio
import time
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
    then `await pulse.after(seen)` wakes at the first change since."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def fire(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def after(self, seen: int) -> int:
        while self.version == seen:
            await self._event.wait()
        return self.version
