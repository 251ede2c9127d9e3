"""The cost model of DESIGN.md: per-token latency and pipeline bottleneck of a plan."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from meshshard.planner.instance import Instance, InstanceError

# Relative slack on memory checks, so prefix sums and plain sums agree on tight fits.
MEM_SLACK = 1e-9


def fits(need: float, mem: float) -> bool:
    return need <= mem * (1 + MEM_SLACK)


@dataclass(frozen=True)
class Stage:
    device: str
    start: int
    end: int  # exclusive


@dataclass(frozen=True)
class Cost:
    latency_ms: float
    bottleneck_ms: float
    compute_ms: tuple[float, ...]  # per stage
    hop_ms: tuple[float, ...]  # into each stage after the first
    return_ms: float

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else float("inf")


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


def evaluate(inst: Instance, stages: Sequence[Stage], allow_revisits: bool = False) -> Cost:
    check_plan(inst, stages, allow_revisits)
    compute = tuple(sum(inst.device(s.device).ms[s.start : s.end]) for s in stages)
    hops = tuple(
        inst.hop_ms(a.device, b.device, inst.units[b.start - 1].out_bytes)
        for a, b in itertools.pairwise(stages)
    )
    ret = inst.hop_ms(stages[-1].device, inst.source, inst.return_bytes)
    return Cost(
        latency_ms=sum(compute) + sum(hops) + ret,
        bottleneck_ms=max((*compute, *hops, ret)),
        compute_ms=compute,
        hop_ms=hops,
        return_ms=ret,
    )
