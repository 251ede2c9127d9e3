"""One answer's frames at its origin (its tokens, errors, handoffs done), in the order they came.

An origin waits on an answer's next frame, a change of the mesh and a timeout at once. With a
task for each (asyncio.wait, then cancelling the others), a frame took six turns of the loop
to reach its waiter; where this peer is also a stage that runs short passes on the loop
(stage.py `_run_now`), a turn holds a pass, so tokens reached clients in bunches of three
about 200 ms apart while the chain ran steadily (docs/experiments/token-bunching.txt). Here
the waiter awaits one future of its own, which any of the three resolves: one turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

from meshshard.clock import Pulse, wake
from meshshard.wire import DataFrame


class Inbox:
    def __init__(self) -> None:
        self._frames: deque[DataFrame] = deque()
        self._woken: asyncio.Future[None] | None = None

    def put(self, frame: DataFrame) -> None:
        self._frames.append(frame)
        if self._woken is not None:
            wake(self._woken)

    def empty(self) -> bool:
        return not self._frames

    def pop(self) -> DataFrame | None:
        """The oldest frame not yet taken, or None."""
        return self._frames.popleft() if self._frames else None

    @contextlib.contextmanager
    def waking(self, future: asyncio.Future[None]) -> Iterator[None]:
        """Within: the next frame resolves `future` (one waiter at a time)."""
        self._woken = future
        try:
            yield
        finally:
            self._woken = None


async def next_frame(inbox: Inbox, pulse: Pulse, seen: int, timeout: float) -> DataFrame | None:
    """The next frame in `inbox`, or None once `pulse` moved past `seen` or `timeout` seconds
    passed."""
    if (frame := inbox.pop()) is not None or pulse.version != seen:
        return frame
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(max(timeout, 0.0), wake, woken)
    try:
        with inbox.waking(woken), pulse.waking(woken):
            await woken
    finally:
        timer.cancel()
    return inbox.pop()
