"""Tokens per second of a plan with N answers in flight: the chain's scheduler played out.

The paper's throughput, 1 / the slowest stage or hop, is the rate of an endless stream of
micro-batches through stages of fixed speed. Our stages batch whichever sessions wait for them
into one forward pass, so what N answers reach depends on what each stage's batch costs at its
size (measured: math libraries pick kernels by size, so two rows can cost as much as two
steps and four rows less), on the per-session work a busy stage does beside its forward
passes, and on how sessions bunch up and spread on the way round. Pure and deterministic:
events on a simulated clock.

N answers asked at once start together: their prompts wait at the first stage and share one
pass (up to MAX_BATCH); from there they spread into waves, at most one a stage (as many as
`best_waves` finds fastest, which is what the mesh runs), each stage taking a wave's rows at
most and, where batching pays, holding a batch for rows due within a pass (chain/waves.py,
played out here as the stages run it). That is the mesh's schedule, and the one its
throughput is measured under. Answers started a round apart (`together=False`) stay spread
where batching does not pay: the paper's pipeline, each stage busy with one micro-batch
while the others compute theirs.
"""

from __future__ import annotations

import functools
import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from meshshard.chain.waves import Arrivals, Waves, wave_rows
from meshshard.model.batching import BATCHES, MAX_BATCH
from meshshard.planner.cost import Stage
from meshshard.planner.instance import Instance

TOKENS = 64  # per answer, as the experiments ask for
MARGIN = 1.03  # more waves must model this much faster: the model's costs are measured

# Events at one instant: frames land and batches finish before an idle stage starts, so what
# arrives together is batched together.
_ORDER = {"arrive": 0, "done": 0, "start": 1}


@dataclass(frozen=True)
class Speculation:
    """Passes that verify drafts: positions each pass runs (1 + drafted tokens) and tokens
    it yields (1 + confirmed ones), on average. A pass of several positions costs what the
    profile's batch timings say for that many rows (at a short context the weights, not
    attention, dominate: a position costs what a row does) and sends that many activations."""

    positions: float = 1.0
    tokens: float = 1.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.tokens <= self.positions:
            raise ValueError("a pass yields 1 to `positions` tokens")


PLAIN = Speculation()


@dataclass(frozen=True)
class Pace:
    """A device's passes as measured serving over what its profile says: of one row, and of
    several rows (a peer publishes its one-row pace for these until a burst has run there,
    publish.py `estimates`; 1.0: nothing ran). Apart, as a profile kept for days can be off
    by a different share at each size."""

    one: float = 1.0
    several: float = 1.0


@dataclass(frozen=True)
class Overhead:
    """A device's work beyond its forward passes, as measured serving (chain/meter.py
    StepCostMeter): a step's own, and a pass's own, which its rows share."""

    step_ms: float = 0.0
    pass_ms: float = 0.0


@dataclass(frozen=True)
class FlowStage:
    one_ms: float  # forward pass of one session's step
    batch_ms: tuple[float, ...]  # ... of BATCHES[k] sessions' steps at once
    hop_ms: float  # link delay into this stage (none into the first)
    frame_ms: float  # one frame's time on that link (bytes / rate)
    overhead_ms: float = 0.0  # per session in a batch, beyond the forward pass
    pass_overhead_ms: float = 0.0  # ... per pass, whatever its rows

    def pass_ms(self, sessions: int, spec: Speculation = PLAIN) -> float:
        """A batch's forward pass, over its sessions' positions."""
        return self.step_ms(sessions * spec.positions)

    def step_ms(self, sessions: float) -> float:
        return at_size(sessions, self.one_ms, self.batch_ms)


def at_size(rows: float, one_ms: float, batch_ms: Sequence[float]) -> float:
    """A pass of `rows` from passes of one row and of each of BATCHES rows: measured sizes as
    they are, sizes between them on the line joining them."""
    sizes, times = (1, *BATCHES), (one_ms, *batch_ms)
    for k in range(1, len(sizes)):
        if rows <= sizes[k]:
            a, b = sizes[k - 1], sizes[k]
            return times[k - 1] + (rows - a) * (times[k] - times[k - 1]) / (b - a)
    return times[-1] * rows / sizes[-1]


def alone(stages: tuple[FlowStage, ...], saving_ms: Sequence[float]) -> tuple[FlowStage, ...]:
    """The stages as a lone answer runs them where the head is split: the last stage's pass
    of one row, and of each of BATCHES rows (a draft's verification), shorter by what the
    split saves it (planner/headsplit.py)."""
    if not any(saving_ms) or not stages:
        return stages
    return _last_shorter(stages, saving_ms[0], saving_ms[1:])


def waved(
    stages: tuple[FlowStage, ...], cut_ms: Sequence[float], added_ms: Sequence[float]
) -> tuple[FlowStage, ...]:
    """The stages as waves run them where the first stage scores each wave's head: the last
    stage's passes of each of BATCHES rows shorter by what that sheds, the first stage's
    longer by what it takes on (planner/headsplit.py wave_head_ms; a lone answer's passes
    keep their own). In one wave the round is shorter by the difference; in several the first
    stage's share of each round grows as the last's shrinks."""
    if not (any(cut_ms) or any(added_ms)) or len(stages) < 2:
        return stages
    longer = (ms + a for ms, a in zip(stages[0].batch_ms, added_ms, strict=True))
    first = replace(stages[0], batch_ms=tuple(longer))
    return _last_shorter((first, *stages[1:]), 0.0, cut_ms)


def _last_shorter(
    stages: tuple[FlowStage, ...], one_cut: float, batch_cuts: Sequence[float]
) -> tuple[FlowStage, ...]:
    last = stages[-1]
    one = max(last.one_ms - one_cut, 0.0)
    several = (max(ms - cut, 0.0) for ms, cut in zip(last.batch_ms, batch_cuts, strict=True))
    return (*stages[:-1], replace(last, one_ms=one, batch_ms=tuple(several)))


def profiled(
    unit_ms: Sequence[float], batch_units: Sequence[Sequence[float]], start: int, end: int
) -> tuple[float, tuple[float, ...]]:
    """What a profile says passes over units [start, end) cost: one session's step, and
    BATCHES[k] sessions' steps at once (without batched timings: no gain from batching)."""
    one = sum(unit_ms[start:end])
    if len(batch_units) == len(BATCHES) and all(len(u) == len(unit_ms) for u in batch_units):
        return one, tuple(max(sum(units[start:end]), one) for units in batch_units)
    return one, tuple(size * one for size in BATCHES)


def flow_stages(
    inst: Instance,
    stages: Sequence[Stage],
    batch_ms: Mapping[str, Sequence[Sequence[float]]],
    overhead: Mapping[str, Overhead],
    pace: Mapping[str, Pace] | None = None,
) -> tuple[tuple[FlowStage, ...], float]:
    """The plan's stages as the model needs them, and the return hop of a token. batch_ms:
    per device, per size in BATCHES, per unit. overhead: per device, its work beyond its
    forward passes. pace: per device, its passes as measured serving over what its profile
    says (a profile is kept for days; the host's speed moves within an hour)."""
    out = []
    for i, s in enumerate(stages):
        one, several = profiled(
            inst.device(s.device).ms, batch_ms.get(s.device) or (), s.start, s.end
        )
        scale = (pace or {}).get(s.device, Pace())
        beyond = overhead.get(s.device, Overhead())
        hop = frame = 0.0
        if i and s.device != stages[i - 1].device:
            link = inst.link(stages[i - 1].device, s.device)
            hop, frame = link.ms, inst.units[s.start - 1].out_bytes * 8 / (link.mbps * 1000)
        out.append(
            FlowStage(
                one * scale.one,
                tuple(x * scale.several for x in several),
                hop,
                frame,
                beyond.step_ms,
                beyond.pass_ms,
            )
        )
    return tuple(out), inst.hop_ms(stages[-1].device, inst.source, inst.return_bytes)


def latency_ms(stages: Sequence[FlowStage], return_ms: float, spec: Speculation = PLAIN) -> float:
    """One answer's time per token: every stage's forward pass, every hop, and the tokens'
    way back, for a pass, shared by the tokens the pass yields. A stage's per-step work runs
    while the others compute (see _Chain); only what does not fit there lengthens the round."""
    one_pass = sum(s.pass_ms(1, spec) + s.hop_ms + s.frame_ms * spec.positions for s in stages)
    round_ms = one_pass + return_ms
    late = sum(
        max(0.0, s.overhead_ms + s.pass_overhead_ms - (round_ms - s.pass_ms(1, spec)))
        for s in stages
    )
    return (round_ms + late) / spec.tokens


@functools.lru_cache(maxsize=256)
def tokens_per_s(
    stages: tuple[FlowStage, ...],
    return_ms: float,
    sessions: int,
    tokens: int = TOKENS,
    spec: Speculation = PLAIN,
    together: bool = True,
    waves: int | Waves = 1,
) -> float:
    """Aggregate decode rate of `sessions` answers of `tokens` each, asked at once (or, not
    `together`, started evenly spread over one round of the chain), over the span when every
    one of them is decoding, spread over `waves` (a count, or counts by answers decoding:
    waves.wave_rows)."""
    if sessions < 1 or not stages:
        raise ValueError("a flow needs at least one session and one stage")
    per_token = latency_ms(stages, return_ms, spec)
    if sessions == 1:
        return 1000.0 / per_token if per_token > 0 else float("inf")
    passes = max(2, round(tokens / spec.tokens))
    round_ms = per_token * spec.tokens
    sim = _Chain(stages, return_ms, sessions, passes, spec, waves)
    for k in range(sessions):
        sim.push(0.0 if together else k * round_ms / sessions, "arrive", 0, k)
    times = sim.run()
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    produced = spec.tokens * sum(start < t <= end for each in times for t in each)
    return produced * 1000.0 / (end - start) if end > start else float("inf")


def best_waves(
    stages: tuple[FlowStage, ...],
    return_ms: float,
    sessions: int,
    spec: Speculation = PLAIN,
) -> int:
    """How many waves (at most one a stage) `sessions` answers at once go round fastest in:
    more waves keep more stages busy at once, each with a pass of fewer rows, which costs
    more a row (docs/benchmarks/layers.txt: on a CPU, a pass of 4 rows of SmolLM2 cost 0.8
    of one of 8). Fewer waves where it is as fast (within MARGIN): they hold the steps of
    more answers together."""
    best, rate = 1, tokens_per_s(stages, return_ms, sessions, spec=spec)
    for waves in range(2, min(len(stages), sessions) + 1):
        got = tokens_per_s(stages, return_ms, sessions, spec=spec, waves=waves)
        if got > rate * MARGIN:
            best, rate = waves, got
    return best


def waves_by(
    stages: tuple[FlowStage, ...],
    return_ms: float,
    sessions: int,
    spec: Speculation = PLAIN,
) -> Waves:
    """The waves for 1, 2, ... up to `sessions` answers decoding, the last for any more:
    `best_waves` for `sessions`, and for fewer answers their own where it is fewer waves,
    never fewer for more answers; trailing repeats left out. On a host whose passes of 2 rows
    cost less than one row's, 2 answers go round fastest as one wave, and 8 as two
    (docs/data-plane.md, *W @ xᵀ for the layers*). Never fewer: as a burst's answers join,
    a stage's cap on a wave's rows splits waves, but waves apart join only where they come
    within a pass of each other (waves.py), so a count of fewer waves after one of more left
    a burst of 16 in the two waves it passed through at 8 (lan-3 run 110). No more than for
    `sessions`: a count of more waves for fewer answers then holds for all above it (office,
    held out: 3 waves from 5 answers on, where 2 had carried 8 and 16 a third faster)."""
    last = best_waves(stages, return_ms, sessions, spec)
    fewer = (min(best_waves(stages, return_ms, n, spec), last) for n in range(1, sessions))
    counts = [*itertools.accumulate(fewer, max), last]
    while len(counts) > 1 and counts[-2] == counts[-1]:
        counts.pop()
    return tuple(counts)


class _Chain:
    def __init__(
        self,
        stages: Sequence[FlowStage],
        return_ms: float,
        sessions: int,
        passes: int,
        spec: Speculation,
        waves: int | Waves,
    ) -> None:
        self.stages, self.return_ms, self.passes, self.spec = stages, return_ms, passes, spec
        self.waves = waves
        self.queues: list[deque[int]] = [deque() for _ in stages]
        self.busy = [False] * len(stages)
        self.link_free = [0.0] * len(stages)
        # Per-session work (frames in and out, sealing, sampling) left by each stage's last
        # batch, and since when the stage has been free to do it: it runs while the stage
        # waits, and what is left when its next batch starts shares the CPU with that pass.
        # (lan-3, run 12: a pass's wall time stays at its CPU time over the quota, and a
        # round is the passes and the hops, while the work measured is 2-7 ms a session.)
        self.work = [0.0] * len(stages)
        self.free_since = [0.0] * len(stages)
        self.times: list[list[float]] = [[] for _ in range(sessions)]
        # Each stage's rule for holding a batch for rows due soon, as the stages run it: what
        # it has seen arrive, its last decode pass's time, since when it holds.
        self.arrivals = [Arrivals[int]() for _ in stages]
        self.seen: list[set[int]] = [set() for _ in stages]
        self.pass_ms = [0.0] * len(stages)
        self.held_since: list[float | None] = [None] * len(stages)
        self.live = set(range(sessions))
        self.events: list[tuple[float, int, int, str, int, tuple[int, ...]]] = []
        self._seq = itertools.count()

    def push(self, at: float, kind: str, stage: int, *sessions: int) -> None:
        heapq.heappush(self.events, (at, _ORDER[kind], next(self._seq), kind, stage, sessions))

    def run(self) -> list[list[float]]:
        """Each session's pass times."""
        while self.events:
            now, _, _, kind, i, sessions = heapq.heappop(self.events)
            if kind == "arrive":
                for session in sessions:  # a session's first pass at a stage is its prompt
                    self.arrivals[i].arrived(session, now, session in self.seen[i])
                    self.seen[i].add(session)
                self.queues[i].extend(sessions)
                self.push(now, "start", i)
            elif kind == "start":
                self._start(now, i)
            else:
                self._done(now, i, sessions)
        return self.times

    def _start(self, now: float, i: int) -> None:
        if self.busy[i] or not self.queues[i]:
            return
        waiting = set(self.queues[i])
        decoding = self.decoding(waiting)
        # Prompts share a pass up to MAX_BATCH; decode steps go in waves (waves.wave_rows).
        most = wave_rows(len(self.live), self.waves) if decoding else MAX_BATCH
        stage = self.stages[i]
        if len(waiting) < most and decoding:
            held = self.held_since[i]
            since = now if held is None else held
            hold = self.arrivals[i].hold(
                waiting, self.live, now, since, self.pass_ms[i], stage.step_ms
            )
            if hold > 1e-9:
                self.held_since[i] = since
                self.push(now + hold, "start", i)
                return
        self.held_since[i] = None
        batch = [self.queues[i].popleft() for _ in range(min(most, len(self.queues[i])))]
        self.busy[i] = True
        left = max(0.0, self.work[i] - (now - self.free_since[i]))
        took = stage.pass_ms(len(batch), self.spec) + left
        self.work[i] = 0.0
        if self.decoding(batch):  # what a hold is measured by
            self.pass_ms[i] = took
            self.arrivals[i].ran(batch)
        self.push(now + took, "done", i, *batch)

    def decoding(self, sessions: Iterable[int]) -> bool:
        """Whether the sessions' steps are decode steps (their prompts have gone round)."""
        return all(self.times[s] for s in sessions)

    def _done(self, now: float, i: int, batch: tuple[int, ...]) -> None:
        self.busy[i] = False
        stage = self.stages[i]
        self.work[i] += stage.pass_overhead_ms + len(batch) * stage.overhead_ms
        self.free_since[i] = now
        if i + 1 < len(self.stages):
            nxt = self.stages[i + 1]
            for session in batch:  # frames leave one after another on the link
                leave = max(now, self.link_free[i + 1])
                frame = nxt.frame_ms * self.spec.positions
                self.link_free[i + 1] = leave + frame
                self.push(leave + frame + nxt.hop_ms, "arrive", i + 1, session)
        else:
            back = now + self.return_ms
            for session in batch:
                self.times[session].append(back)
                if len(self.times[session]) < self.passes:
                    self.push(back, "arrive", 0, session)
                else:
                    self.live.discard(session)
        self.push(now, "start", i)
