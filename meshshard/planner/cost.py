"""The cost model of DESIGN.md: per-token latency and pipeline bottleneck of a plan, and the
one throughput every part of the planner means: steady tokens/s with N answers in flight.

A token of one answer goes round the whole chain: every stage's compute, every hop (its
delay and its bytes at the link's rate) and the way back: the latency L. With N answers in
flight the chain is a closed loop of N tokens; the busiest stage or link per token B (a
stage's compute, or a frame's time on a link: a link's delay is not busy time, the next frame
goes out behind it) caps the rate at 1/B, and the N tokens in the loop cap it at N/L. So
rate(N) = 1 / max(B, L / N): exact for one answer and for deterministic times
(`planner/flow.py` plays the chain out, with batching, and agrees where batching gains
nothing).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from meshshard.planner.instance import Instance, InstanceError

# Relative slack on memory checks, so prefix sums and plain sums agree on tight fits.
MEM_SLACK = 1e-9
SESSIONS = 8  # answers in flight that a throughput figure means, unless said otherwise


def fits(need: float, mem: float) -> bool:
    return need <= mem * (1 + MEM_SLACK)


@dataclass(frozen=True)
class Stage:
    device: str
    start: int
    end: int  # exclusive


@dataclass(frozen=True)
class Cost:
    latency_ms: float  # one token's way round the chain
    bottleneck_ms: float  # the busiest stage or link per token
    compute_ms: tuple[float, ...]  # per stage
    hop_ms: tuple[float, ...]  # into each stage after the first (delay + bytes)
    return_ms: float
    sessions: int = SESSIONS  # answers in flight its throughput is for

    def ms_per_token(self, sessions: int | None = None) -> float:
        """The chain's time per token with `sessions` answers in flight (default: its own)."""
        return per_token_ms(self.bottleneck_ms, self.latency_ms, sessions or self.sessions)

    @property
    def tokens_per_s(self) -> float:
        ms = self.ms_per_token()
        return 1000.0 / ms if ms > 0 else float("inf")


def per_token_ms(bottleneck_ms: float, latency_ms: float, sessions: int) -> float:
    """max(B, L / N): see the module's docstring."""
    return max(bottleneck_ms, latency_ms / max(1, sessions))


def check_plan(inst: Instance, stages: Sequence[Stage], allow_revisits: bool = False) -> None:
    """Raise InstanceError unless the stages form a valid plan for the instance."""
    if not stages:
        raise InstanceError("a plan needs at least one stage")
    if stages[0].device != inst.source:
        raise InstanceError(f"stage 0 must run on the source {inst.source!r}")
    if stages[0].start != 0 or stages[-1].end != inst.n:
        raise InstanceError("stages must cover every unit")
    for a, b in itertools.pairwise(stages):
        if a.end != b.start:
            raise InstanceError("stages must be contiguous and in order")
    used: dict[str, float] = {}
    for s in stages:
        if not 0 <= s.start < s.end <= inst.n:
            raise InstanceError(f"stage {s} is empty or out of range")
        if s.device in used and not allow_revisits:
            raise InstanceError(f"device {s.device!r} appears in two stages")
        used[s.device] = used.get(s.device, 0.0) + sum(u.mem for u in inst.units[s.start : s.end])
    for name, mem in used.items():
        if not fits(mem, inst.device(name).mem):
            raise InstanceError(
                f"device {name!r} needs {mem:.3g} bytes, has {inst.device(name).mem:.3g}"
            )


def evaluate(
    inst: Instance,
    stages: Sequence[Stage],
    allow_revisits: bool = False,
    sessions: int = SESSIONS,
) -> Cost:
    check_plan(inst, stages, allow_revisits)
    compute = tuple(sum(inst.device(s.device).ms[s.start : s.end]) for s in stages)
    pairs = list(itertools.pairwise(stages))
    sent = [inst.units[b.start - 1].out_bytes for _, b in pairs]
    hops = tuple(inst.hop_ms(a.device, b.device, n) for (a, b), n in zip(pairs, sent, strict=True))
    frames = [inst.frame_ms(a.device, b.device, n) for (a, b), n in zip(pairs, sent, strict=True)]
    back = (stages[-1].device, inst.source, inst.return_bytes)
    ret = inst.hop_ms(*back)
    return Cost(
        latency_ms=sum(compute) + sum(hops) + ret,
        bottleneck_ms=max((*compute, *frames, inst.frame_ms(*back))),
        compute_ms=compute,
        hop_ms=hops,
        return_ms=ret,
        sessions=sessions,
    )
