"""What our stage is doing, as our profile tells the mesh: its load, its step's cost beyond
the forward pass, and its paces (its passes as measured over what the profile says), which
the coordinator prices our passes by (planner/flow.py) and other peers' dashboards show."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from meshshard.chain.meter import Passes, StepCostMeter, pace
from meshshard.chain.service import ChainService
from meshshard.chain.stage import StageWorker
from meshshard.mesh.node import ControlNode
from meshshard.planner.flow import FlowStage, profiled
from meshshard.types import Profile
from meshshard.wire.checks import MAX_PACE, MIN_PACE


def load_publisher(node: ControlNode, service: ChainService) -> Callable[[], Awaitable[None]]:
    """Put what our stage is doing into our profile, for other peers' dashboards and the
    coordinator's throughput model; only changes worth showing, so gossip stays quiet."""
    costs = StepCostMeter()
    bursts = False  # whether passes of several rows have run here yet

    async def publish() -> None:
        nonlocal bursts
        await asyncio.sleep(node.timings.load_period)
        me = node.profiles[node.id]
        stage = service.follower.stage
        load = float(len(stage.shard.sessions)) if stage else 0.0
        step = stage.costs.step_ms if stage else 0.0
        used = float(stage.shard.weight_bytes() + stage.shard.kv_bytes()) if stage else 0.0
        if (standby := service.follower.standby) is not None:
            used += standby.weight_bytes()
        if stage is not None:
            costs.observe(
                stage,
                time.monotonic(),
                time.process_time(),
                stage.forward_cpu_s,
                stage.forward_s,
                stage.steps,
                stage.batches,
            )
        per_pass, overhead = (round(x, 3) for x in costs.parts())
        one, several = paces(me, stage)
        bursts = bursts or several is not None
        speed, bulk = estimates(me, one, several, bursts)
        if (
            load != me.load
            or abs(step - me.step_ms) > 0.2 * max(me.step_ms, 1.0)
            or abs(used - me.used) > 0.1 * max(me.used, 1e6)
            or abs(overhead - me.overhead_ms) > 0.2 * max(me.overhead_ms, 0.1)
            or abs(per_pass - me.pass_overhead_ms) > 0.2 * max(me.pass_overhead_ms, 0.1)
            or abs(speed - me.pace) > 0.05 * me.pace
            or abs(bulk - me.batch_pace) > 0.05 * me.batch_pace
        ):
            node.set_profile(
                replace(
                    me,
                    load=load,
                    step_ms=step,
                    used=used,
                    overhead_ms=overhead,
                    pass_overhead_ms=per_pass,
                    pace=speed,
                    batch_pace=bulk,
                )
            )

    return publish


def paces(me: Profile, stage: StageWorker | None) -> tuple[float | None, float | None]:
    """Our stage's passes of one row, and of several, over what our profile says they cost,
    each size averaged over its last PACE_PASSES (None: none of that kind ran yet). A lone
    answer's passes at a last stage whose head is split stop before the head (its share is
    scored apart, chain/stage.py `_splits`): they are priced without it, as a lone answer's
    passes there are all of that kind."""
    if stage is None or len(me.unit_ms) < stage.shard.end:
        return None, None
    start, end = stage.shard.start, stage.shard.end
    costs = stage.costs
    kinds: list[Passes] = [(costs.paced_ms, costs.passes, _passes(me, start, end))]
    if costs.split_passes and end - start > 1:
        kinds.append((costs.paced_split_ms, costs.split_passes, _passes(me, start, end - 1)))
    return _bounded(pace(*kinds, several=False)), _bounded(pace(*kinds, several=True))


def estimates(
    me: Profile, one: float | None, several: float | None, bursts: bool
) -> tuple[float, float]:
    """The paces we publish: each kind's as our stage measured it, else as last published;
    for passes of several rows, until some have run here (`bursts`), the pace of one row's.
    The profile timed both sizes in the same rounds (model/profile.py `_batched`), so what
    the host's speed has done since moved both alike: a burst's first passes priced by the
    profile alone were priced at the hour it was taken (held-out testbeds, fifteenth time:
    4 answers ran 1.19-1.48x the rate so predicted, docs/testbed.md)."""
    speed = round(one or me.pace, 3)
    bulk = several if several is not None else me.batch_pace if bursts else speed
    return speed, round(bulk, 3)


def _bounded(pace: float | None) -> float | None:
    return None if pace is None else min(max(pace, MIN_PACE), MAX_PACE)


def _passes(me: Profile, start: int, end: int) -> Callable[[float], float]:
    """What our profile says a pass of some rows over units [start, end) costs."""
    one, several = profiled(me.unit_ms, me.batch_ms, start, end)
    return FlowStage(one, several, 0.0, 0.0).step_ms
