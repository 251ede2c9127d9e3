"""A watch on this peer's own event loop: probes are answered there, so a loop that cannot
run (a thread holding the GIL inside C code, a throttled or swapping host) makes a live peer
look dead to the others. The watch logs each stall with its length, and counts them for
`status`, so a false death can be traced to its cause."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TICK = 0.05  # seconds between looks


@dataclass
class StallWatch:
    threshold: float  # a stall at least this long is logged and counted
    clock: Callable[[], float] = time.monotonic
    count: int = 0
    longest: float = 0.0

    def observe(self, late: float) -> None:
        """The loop woke `late` seconds after it asked to."""
        if late < self.threshold:
            return
        self.count += 1
        self.longest = max(self.longest, late)
        logger.warning("event loop stalled for %.2f s (probes went unanswered meanwhile)", late)

    async def run(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        while True:
            before = self.clock()
            await sleep(TICK)
            self.observe(self.clock() - before - TICK)
