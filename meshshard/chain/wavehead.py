"""A wave's head at the first stage (planner/headsplit.py says when it pays).

A chain whose answers go round in one wave keeps its first stage idle while the last one
runs, so where the first is faster at the head (lan-3: a desk's core against a laptop's half
core) the last stage sends a whole wave's normed hidden states, a StepFrame each with
`together` the pass's rows, and the first stage scores the whole head of all of them in one
product once they have come (one product of the wave's rows costs a fraction of one per
row), then feeds the wave's next steps on together.

Rows leave the last stage back to back, so all come within a frame's time of each other; if
one never does (its pass failed there), those held are scored after WAIT_S.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshshard.chain.worker import model_idle, run_inline
from meshshard.wire import StepFrame

WAIT_S = 0.05
RETRY_S = 0.005  # a wait run out while the model thread is busy: looked at again this often

Score = Callable[[list[StepFrame]], tuple[int, ...]]  # the whole head's token of each row
Fed = Callable[[list[StepFrame], tuple[int, ...]], None]  # ... and what is done with them


class WaveRows:
    """A wave's rows held until all of its pass's have come."""

    def __init__(self) -> None:
        self._rows: list[StepFrame] = []

    def add(self, frame: StepFrame) -> list[StepFrame]:
        """The rows to score now: all held, once `frame.together` have come (none before)."""
        self._rows.append(frame)
        return self.take() if len(self._rows) >= frame.together else []

    def take(self) -> list[StepFrame]:
        rows, self._rows = self._rows, []
        return rows

    def forget(self, session: str) -> None:
        self._rows = [f for f in self._rows if f.session != session]

    def __len__(self) -> int:
        return len(self._rows)


class WaveHead:
    """The first stage's side: rows held, scored together on the loop (or in the model
    thread where it is busy), and fed on."""

    def __init__(self, score: Score, fed: Fed) -> None:
        self._score, self._fed = score, fed
        self.rows = WaveRows()
        self._timer: asyncio.TimerHandle | None = None

    def add_now(self, frame: StepFrame) -> None:
        """A row, with the model thread idle: the wave scored at once if it is the last."""
        if rows := self.rows.add(frame):
            self._done(rows, self._score(rows))
        else:
            self._wait(WAIT_S)

    async def add(self, frame: StepFrame) -> None:
        if rows := self.rows.add(frame):
            self._done(rows, await run_inline(self._score, rows))
        else:
            self._wait(WAIT_S)

    def take(self) -> list[StepFrame]:
        """What is held, no longer waited for (its stage is closing)."""
        self._wait(None)
        return self.rows.take()

    def _done(self, rows: list[StepFrame], tokens: tuple[int, ...]) -> None:
        self._wait(None)
        self._fed(rows, tokens)

    def _wait(self, seconds: float | None) -> None:
        """Score what is held after `seconds` unless the rest comes first (None: not at all)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds is not None and self.rows:
            self._timer = asyncio.get_running_loop().call_later(seconds, self._late)

    def _late(self) -> None:
        self._timer = None
        if not model_idle():
            self._wait(RETRY_S)
        elif rows := self.rows.take():
            self._done(rows, self._score(rows))
