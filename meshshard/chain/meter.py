"""How fast answers from this origin come: the measured side of the planner's prediction."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

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


class StepCostMeter:
    """What a step costs this peer beyond its forward pass (receiving and sending frames,
    sealing, sampling, an origin's streaming), from CPU time while it serves: the process's
    CPU less the model thread's and less what the peer spends anyway (gossip: the least rate
    of its last idle windows, as one that caught a link probe's bulk transfer says more about
    probes than about gossip), in wall ms at the speed this peer's forward passes run (a
    quarter-core peer spends four times the CPU time in wall time).

    Part of it is a pass's, whatever its rows (waking to it, taking its batch, handing it to
    the model thread), and part each step's: on lan-3 a step cost the laptop 1.9-10 ms after
    a lone answer and 0.5-2.6 ms after bursts of 3.5-7.3 rows a pass (runs 100-125,
    testbed.md, *What a step costs beside its pass*). So windows of one row a pass and of
    several are averaged apart, and the two parts solved from them (`parts`): a lone step
    costs both, each of a burst's rows the pass's part over its rows and its own. Until a
    burst has run, all of it is a step's."""

    MIN_STEPS = 20  # in a window, so what the background does within it averages out
    WEIGHT = 0.3  # of the newest window in the average
    IDLE_WINDOWS = 5
    SEVERAL = 1.5  # rows a pass, on average over a window, that make it a burst's

    def __init__(self) -> None:
        self._lone: float | None = None  # ms a step in windows of lone passes
        self._burst: float | None = None  # ... in windows of bursts
        self._rows: float | None = None  # rows a pass in those
        self._idle: deque[float] = deque(maxlen=self.IDLE_WINDOWS)  # CPU s/s, no steps run
        self._stage: object = None
        self._last = (0.0, 0.0, 0.0, 0.0, 0, 0)

    @property
    def background(self) -> float:
        """CPU seconds a second the peer spends while no steps run."""
        return min(self._idle, default=0.0)

    def parts(self) -> tuple[float, float]:
        """(per pass, per step) from the two kinds of window: the line through them, a
        pass's part at least 0 and at most a lone step's whole cost. Bursts dearer a step
        than lone passes say their rows are what costs: all of it per step, at theirs."""
        lone, burst, rows = self._lone, self._burst, self._rows
        if burst is None or rows is None:
            return 0.0, lone or 0.0
        if lone is None:
            return 0.0, burst
        per_pass = min((lone - burst) / (1 - 1 / rows), lone)
        if per_pass <= 0:
            return 0.0, burst
        return per_pass, lone - per_pass

    def observe(
        self,
        stage: object,
        now: float,
        process_s: float,
        forward_cpu_s: float,
        forward_s: float,
        steps: int,
        passes: int,
    ) -> None:
        """`now` and the process's CPU time, and the stage's counters, at a look."""
        current = (now, process_s, forward_cpu_s, forward_s, steps, passes)
        if stage is not self._stage:  # a new stage counts from zero
            self._stage, self._last = stage, current
            return
        deltas = (a - b for a, b in zip(current, self._last, strict=True))
        elapsed, process, forward_cpu, forward, n, p = deltas
        if n == 0 and elapsed > 0:
            self._last = current
            self._idle.append(process / elapsed)
            return
        if n < self.MIN_STEPS or forward_cpu <= 0:
            return
        self._last = current
        slowdown = max(1.0, forward / forward_cpu)
        spent = max(0.0, process - forward_cpu - self.background * elapsed)
        ms = spent / n * slowdown * 1000
        rows = n / max(p, 1)
        if rows < self.SEVERAL:
            self._lone = _average(self._lone, ms, self.WEIGHT)
        else:
            self._burst = _average(self._burst, ms, self.WEIGHT)
            self._rows = _average(self._rows, rows, self.WEIGHT)


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + (new - old) * weight


Passes = tuple[Mapping[int, float], Mapping[int, int], Callable[[float], float]]
MIN_PRICED_MS = 1.0  # a pass priced at less says nothing of its device's pace


def pace(*kinds: Passes, several: bool) -> float | None:
    """A stage's decode passes of one row (or, `several`, of more) as it measured them, by
    rows, over what its profile says passes of those rows cost, each size weighted by how
    often it ran; None before any ran. kinds: per kind of pass (whole, or a lone answer's
    with its head split), its average ms by rows, how many of each ran, and what the profile
    says one of that kind costs. The flow model scales the profile by it (planner/flow.py).
    None too for passes priced under MIN_PRICED_MS on average: what they measure is what
    any pass costs beside its products, and under a CPU quota the wait for the next period,
    not the device's speed (campus's kiosk, which only embeds, priced at 0.08 ms a pass,
    published paces of 3-9, and the flow model scaled its share of a split head by them)."""
    ran = [
        (n, pass_ms[rows], profiled(rows))
        for pass_ms, passes, profiled in kinds
        for rows, n in passes.items()
        if rows in pass_ms and (rows > 1) == several
    ]
    expected = sum(n * want for n, _, want in ran)
    if expected < MIN_PRICED_MS * sum(n for n, _, _ in ran) or expected <= 0:
        return None
    return sum(n * got for n, got, _ in ran) / expected
