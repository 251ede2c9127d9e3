"""How fast answers from this origin come: the measured side of the planner's prediction."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW = 10.0  # seconds of tokens behind tokens/s
GAP_WEIGHT = 0.1  # of the newest gap in the per-token latency average


class TokenMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._recent: deque[float] = deque()
        self.latency_ms = 0.0  # moving average of the gap between a session's tokens

    def token(self, session: str) -> None:
        now = self._clock()
        if (last := self._last.get(session)) is not None:
            gap = (now - last) * 1000
            self.latency_ms = (
                gap
                if not self.latency_ms
                else self.latency_ms + GAP_WEIGHT * (gap - self.latency_ms)
            )
        self._last[session] = now
        self._recent.append(now)

    def end(self, session: str) -> None:
        self._last.pop(session, None)

    def tokens_per_s(self) -> float:
        """Tokens in the last WINDOW seconds over the time they span to now."""
        now = self._clock()
        while self._recent and self._recent[0] < now - WINDOW:
            self._recent.popleft()
        if len(self._recent) < 2:
            return 0.0
        return len(self._recent) / max(now - self._recent[0], 1.0)
