"""When a stage should hold a decode batch for rows about to arrive. Pure: times are passed in.

Sessions decoding through a chain settle into waves: a stage runs whatever waits when its
last pass ends, so answers that started apart stay apart, and every wave pays for reading
all of the stage's weights. On a CPU a pass of 8 rows costs about 2x a pass of one
(SmolLM2-135M: 1 row 55 ms, 2 rows 67, 8 rows 111), so 8 answers in 4 waves spend twice
the compute of one wave of 8. A stage therefore holds a batch while a session it has seen
decoding is due within the time a pass takes: holding for it costs at most what a pass of
its own would, and waves that meet stay together (they arrive together ever after).

A session is due one interval (between its last two decode steps here) after its last.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class _Seen:
    at: float  # when its last decode step arrived
    interval: float | None  # since the decode step before it; None after a prompt


class Arrivals:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}

    def arrived(self, session: str, now: float, decode: bool) -> None:
        """A step of `session` arrived: a decode step (one new token, maybe a draft) or
        anything else (a prompt's chunk, a feed after a replay), after which its rhythm is
        unknown until two decode steps have come."""
        before = self._seen.get(session)
        if not decode:
            self._seen.pop(session, None)
        elif before is None:
            self._seen[session] = _Seen(now, None)
        else:
            self._seen[session] = _Seen(now, now - before.at)

    def hold(
        self, waiting: Collection[str], live: Collection[str], now: float, since: float, most: float
    ) -> float:
        """Seconds to keep holding a batch of the `waiting` sessions' steps, held since
        `since` (0: run it now): until `since + most`, while any other `live` session is due
        within `most` of `since` (late ones count, as they may be just behind)."""
        for gone in [s for s in self._seen if s not in live]:
            del self._seen[gone]
        left = since + most - now
        if left <= 0:
            return 0.0
        for session, seen in self._seen.items():
            if session in waiting or seen.interval is None:
                continue
            due = seen.at + seen.interval
            if since - most <= due <= since + most:
                return left
        return 0.0
