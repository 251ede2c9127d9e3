"""Brute force over every plan: the oracle the tests hold the DP to. Small instances only."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from meshshard.planner.cost import SESSIONS, Cost, Stage, evaluate
from meshshard.planner.instance import Instance, InstanceError


def all_plans(inst: Instance) -> Iterator[tuple[list[Stage], Cost]]:
    """Every valid plan with its cost."""
    others = [d.name for d in inst.devices if d.name != inst.source]
    n = inst.n
    for size in range(1, min(len(others) + 1, n) + 1):
        for order in itertools.permutations(others, size - 1):
            devices = [inst.source, *order]
            for cuts in itertools.combinations(range(1, n), size - 1):
                bounds = [0, *cuts, n]
                stages = [
                    Stage(d, a, b) for d, a, b in zip(devices, bounds, bounds[1:], strict=False)
                ]
                try:
                    yield stages, evaluate(inst, stages)
                except InstanceError:
                    continue


def best_value(inst: Instance, objective: str, sessions: int = SESSIONS) -> float | None:
    """The optimum of the objective (ms per token; throughput: of the chain with `sessions`
    answers in flight), or None when no plan is valid."""
    values = [
        cost.latency_ms if objective == "latency" else cost.ms_per_token(sessions)
        for _, cost in all_plans(inst)
    ]
    return min(values) if values else None
