"""The stage side of a peer: it follows plans, serves and fences step frames, and moves caches.

Plans change make-before-break: a peer loads its shard for a new plan while its old stage
keeps serving, and switches when the whole new chain is ready (or the first frame of the new
epoch arrives). Caches of layers a peer keeps stay where they are; caches of layers that move
are left behind and handed to their new owners when an origin asks (KV handoff). A new session
reserves the KV memory it may grow to (admission); what no one will ask for again (sessions
whose origin left or went quiet, caches left behind too long) is freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from meshshard.chain.admission import KVBudget
from meshshard.chain.drafts import Drafter
from meshshard.chain.following import (
    Load,
    NoUnits,
    Reuse,
    Step,
    WaitNext,
    prepare,
    standby,
    step_verdict,
    switch_now,
)
from meshshard.chain.handoff import LeftBehind
from meshshard.chain.outbox import SendNow
from meshshard.chain.seam import ControlPlane
from meshshard.chain.stage import Observe, StageWorker
from meshshard.chain.stats import ChainStats
from meshshard.chain.tensors import from_wire, to_wire
from meshshard.chain.worker import run_model, run_setup
from meshshard.clock import Clock, Pulse
from meshshard.config import Timings
from meshshard.events import EventLog
from meshshard.model.costs import DTYPE_BYTES
from meshshard.model.device import Placement
from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard
from meshshard.model.spec import ModelSpec
from meshshard.types import PlanRecord
from meshshard.wire import (
    MAX_DRAFT,
    DataFrame,
    ErrorCode,
    ErrorFrame,
    HandoffDone,
    HandoffRequest,
    KVFrame,
    PickFrame,
    StepFrame,
    WireError,
)

logger = logging.getLogger(__name__)

Send = Callable[[str, DataFrame], Awaitable[None]]
ENDED_REMEMBERED = 4096  # ended sessions a stage remembers, to ignore their late frames


@dataclass
class _Prepared:
    """A plan this peer has loaded for and will switch to: its shard (None when the plan
    gives it no units) and the next stage's address."""

    plan: PlanRecord
    shard: Shard | None
    next_addr: str | None


def _reserves(frame: StepFrame) -> tuple[int, bool]:
    """The positions a step's session may reach (its admission), and whether it starts it."""
    positions = max(frame.reserve, frame.start + frame.tensor.shape[0])
    return positions, frame.start == 0 and frame.attempt == 0 and frame.step == 0


class PlanFollower:
    def __init__(
        self,
        control: ControlPlane,
        model_dir: Path,
        placement: Placement,
        spec: ModelSpec,
        memory: float,
        send: Send,
        tell: Send,
        events: EventLog,
        stats: ChainStats,
        pulse: Pulse,
        clock: Clock,
        timings: Timings,
        observe: Observe | None = None,
        send_now: SendNow | None = None,
    ) -> None:
        self.control, self.model_dir, self.placement = control, model_dir, placement
        self._send_now = send_now
        self.spec = spec
        self.memory = memory  # bytes this peer offers: its stage's KV budget is what is left
        self._send, self._tell = send, tell  # `tell`: a send whose failure is only logged
        self.events, self.stats, self.pulse = events, stats, pulse
        self.clock, self.timings = clock, timings
        self.observe = observe
        self.stage: StageWorker | None = None
        self.drafter = Drafter()  # drafts made here, as any plan's first stage
        self.budget = KVBudget(None)  # the serving stage's KV memory, reserved by sessions
        self.left_behind = LeftBehind(timings.left_behind_keep, clock.now)
        self._pending: _Prepared | None = None
        self.standby: Shard | None = None  # a spare's preloaded units (see _keep_standby)
        self._switch = asyncio.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # session -> (origin, last step time)
        # The newest attempt of each session's origin seen here: a chain that feeds itself
        # (StepFrame.loop) may still run an attempt the origin gave up; its steps end here.
        self._attempts: dict[str, int] = {}
        self._kv_in: dict[tuple[str, int], int] = {}  # (session, attempt) -> layers received
        self._handed: dict[str, set[int]] = {}  # layers handed off before we switched plans
        self._ended: OrderedDict[str, None] = OrderedDict()  # sessions dropped here
        self._tg: asyncio.TaskGroup | None = None
        self._stage_task: asyncio.Task[None] | None = None

    @property
    def steps(self) -> int:
        """Steps run by this peer's stages, the one serving now and those before it."""
        return self.stats.steps_before + (self.stage.steps if self.stage else 0)

    # -- following plans ----------------------------------------------------------------------

    async def follow(self, tg: asyncio.TaskGroup) -> None:
        """Prepare for each plan put in force, and switch to it when its chain is ready."""
        self._tg = tg
        followed: PlanRecord | None = None
        while True:
            seen = self.control.version
            plan = self.control.plan()
            if plan is None or plan == followed:
                await self.control.changed(seen)
                continue
            followed = plan
            try:
                await self._prepare(plan)
            except Exception as e:  # a shard that fails to load must not end the peer
                logger.error("[%s] cannot serve epoch %s: %s", self.control.node, plan.epoch, e)
                continue
            await self._await_switch(plan)
            if self.control.plan() == plan:
                await self._keep_standby(plan)

    async def _prepare(self, plan: PlanRecord) -> None:
        """Load what `plan` asks of this peer, while the current stage keeps serving."""
        mine = plan.stage_of(self.control.node)
        index = plan.stages.index(mine) if mine is not None else -1
        nxt = plan.stages[index + 1].device if 0 <= index < len(plan.stages) - 1 else None
        next_addr = self.control.address_of(nxt) if nxt is not None else None
        shards = [p.shard for p in (self.stage, self._pending) if p is not None and p.shard]
        shards += [self.standby] if self.standby is not None else []
        held = [(s.start, s.end) for s in shards]
        match prepare(plan, self.control.node, held, next_addr is not None):
            case NoUnits():
                self._pending = _Prepared(plan, None, None)
                self.control.set_ready(plan.epoch)
                return
            case WaitNext(node=node):
                logger.warning("next stage %s is not a live member; waiting for a new plan", node)
                return
            case Reuse(start=start, end=end):
                shard = next(s for s in shards if (s.start, s.end) == (start, end))
                if shard is self.standby:
                    self.standby = None
                    self.stats.standbys_used += 1
                    self.events.add("shard", f"units {start}..{end - 1} were preloaded: no load")
            case Load(start=start, end=end):
                self.standby = None  # not these units: its memory is needed
                shard = await self._load(start, end, f"for epoch {plan.epoch}")
        self._pending = _Prepared(plan, shard, next_addr)
        if self.control.plan() == plan:
            self.control.set_ready(plan.epoch)

    async def _keep_standby(self, plan: PlanRecord) -> None:
        """A spare preloads the units a fallback of `plan` would give it, so that the loss
        of that stage loads nothing here. Its memory is the spare's own offer, which the
        fallback was planned to fit."""
        want = standby(plan, self.control.node)
        held = self.standby
        if held is not None and (held.start, held.end) != want:
            self.standby = None
        if want is None or self.standby is not None:
            return
        try:
            self.standby = await self._load(*want, f"as a standby for epoch {plan.epoch}")
        except Exception as e:  # a standby is an optimisation: the failover would load
            logger.warning("could not preload units %d..%d: %s", want[0], want[1] - 1, e)

    async def _load(self, start: int, end: int, why: str) -> Shard:
        started = self.clock.now()
        p = self.placement
        shard = await run_setup(
            Shard.load, self.model_dir, start, end, p.dtype, str(p.device), p.quantize
        )
        self.events.add(
            "shard",
            f"loaded units {start}..{end - 1} ({shard.weight_bytes() / 1e6:.0f} MB)"
            f" in {self.clock.now() - started:.1f} s {why}",
        )
        return shard

    async def _await_switch(self, plan: PlanRecord) -> None:
        """Switch to `plan` once its whole chain is ready, unless a newer plan comes first."""
        while self._pending is not None and self._pending.plan == plan:
            seen = self.control.version
            if self.control.plan() != plan:
                return
            if switch_now(self.control.ready(plan), self.stage is not None):
                await self._switch_to(plan)
                return
            await self.control.changed(seen)

    async def _switch_to(self, plan: PlanRecord) -> None:
        async with self._switch:
            pending = self._pending
            if pending is None or pending.plan != plan:
                return
            self._pending = None
            old, task = self.stage, self._stage_task
            if old is not None and task is not None:
                await old.close(f"this stage moved to epoch {plan.epoch}")
                await task
                self.stats.steps_before += old.steps
            caches: dict[str, KVCache] = {}
            if old is not None and old.shard is not pending.shard:
                caches = await run_model(old.shard.take_caches)
            if pending.shard is not None and caches:
                caches = await run_model(pending.shard.adopt, caches)
            for session, layers in self._handed.items():  # their new owners have them
                if session in caches:
                    caches[session].split(layers)
            self._handed.clear()
            caches = {s: c for s, c in caches.items() if c.layers}
            self.left_behind.add(caches)
            self.budget = self._budget(pending.shard).carry(self.budget)
            if pending.shard is None:
                self.stage, self._stage_task = None, None
            else:
                assert self._tg is not None
                self.stage = StageWorker(
                    pending.shard, plan.epoch, pending.next_addr, self._send, self.observe,
                    plan.wave_counts, plan.head_share, self.drafter, self._send_now, plan.wave_head,
                )  # fmt: skip
                self._stage_task = self._tg.create_task(self.stage.run())
            shard = pending.shard
            units = f"units {shard.start}..{shard.end - 1}" if shard else "no units"
            self.events.add(
                "shard",
                f"now serving epoch {plan.epoch}: {units}; "
                f"{len(caches)} sessions' caches left behind for handoff",
            )
        self.pulse.fire()

    def _budget(self, shard: Shard | None) -> KVBudget:
        if shard is None:
            return KVBudget(None)
        size = DTYPE_BYTES[self.placement.dtype]  # KV caches are never quantized
        per_token = sum(
            self.spec.kv_bytes_per_token(u, size) for u in range(shard.start, shard.end)
        )
        return KVBudget.of_stage(self.memory, shard.weight_bytes(), per_token)

    async def close(self) -> None:
        if self.stage is not None and self._stage_task is not None:
            await self.stage.close("this peer is stopping")
            await self._stage_task
        self._stage_task = None
        self.stage = None

    def done(self) -> bool:
        """Nothing of the mesh's is here any more: no stage, no plan to switch to, no cache."""
        return self.stage is None and self._pending is None and not len(self.left_behind)

    # -- serving steps ------------------------------------------------------------------------

    def ended(self, session: str) -> bool:
        return session in self._ended

    async def serve(self, frame: StepFrame) -> None:
        """Fence a step by its epoch (and its attempt: an older one's is dropped), admit a new
        session by the KV budget, then queue it."""
        if self._superseded(frame):
            return
        if self._switch.locked():
            async with self._switch:  # a switch under way: serve from its outcome
                pass
        pending, plan = self._pending, self.control.plan()
        verdict = self._verdict(frame, pending, plan)
        if verdict == Step.SWITCH_AND_SERVE:
            assert pending is not None
            await self._switch_to(pending.plan)  # the origin saw the new chain ready
        elif verdict in (Step.STALE, Step.NOT_READY):
            code = ErrorCode.STALE_EPOCH if verdict == Step.STALE else ErrorCode.NOT_READY
            current = plan.epoch if plan is not None else None
            await self._refuse(frame, code, f"this peer serves epoch {current}")
            return
        if self.ended(frame.session):
            return  # its origin's drop came (by another link) while this step waited
        stage = self.stage
        if stage is None or stage.epoch != frame.epoch:  # the switch did not come to pass
            await self._refuse(frame, ErrorCode.NOT_READY, "this peer is between plans")
            return
        positions, new = _reserves(frame)
        if (problem := self._unfit(stage, frame, positions)) is not None:
            await self._refuse(frame, ErrorCode.BAD_FRAME, problem)
            return
        if not self.budget.admit(frame.session, positions, new):
            self.stats.busy += 1
            held = f"{self.budget.reserved} of {self.budget.tokens}"
            why = f"{self.control.node} has KV cache reserved for {held} tokens"
            await self._refuse(frame, ErrorCode.BUSY, why)
            return
        self._seen[frame.session] = (frame.origin, self.clock.now())
        await stage.put(frame)

    def serve_now(self, frame: StepFrame, at_once: bool) -> bool:
        """`serve` a step of the epoch this peer serves, with no switch under way, without
        waiting (its pass run here where it is short and `at_once`: no other step came with
        it); False (nothing done) where it would wait or refuse: `serve` it then."""
        stage = self.stage
        if stage is None or self._switch.locked():
            return False
        if self._verdict(frame, self._pending, self.control.plan()) != Step.SERVE:
            return False
        if self._superseded(frame):
            return True
        # A session's first step may be refused for room and a step the stage cannot run is
        # refused: `serve` does both. The others reserve what they add.
        positions, new = _reserves(frame)
        if new or self._unfit(stage, frame, positions) is not None:
            return False
        self.budget.admit(frame.session, positions, new=False)
        if not stage.put_now(frame, at_once):
            return False
        self._seen[frame.session] = (frame.origin, self.clock.now())
        return True

    def _unfit(self, stage: StageWorker, frame: StepFrame, positions: int) -> str | None:
        """Why `stage` cannot run the step reaching `positions`: as the stage says, or a
        session past the context (its cache is allocated for the positions it may reach at
        once: a claim of 2**31 failed the allocation, and with it every step batched beside
        it). A draft may verify up to MAX_DRAFT positions past an answer's last."""
        if positions > self.control.context + MAX_DRAFT + 1:
            return f"{positions} positions are past this mesh's context of {self.control.context}"
        return stage.unfit(frame)

    def _verdict(
        self, frame: StepFrame, pending: _Prepared | None, plan: PlanRecord | None
    ) -> Step:
        return step_verdict(
            frame.epoch,
            self.stage.epoch if self.stage is not None else None,
            pending.plan.epoch if pending is not None else None,
            plan.epoch if plan is not None else None,
        )

    def take_pick(self, frame: PickFrame) -> None:
        """The last stage's pick of a split head: for the stage of its epoch (one of an
        older epoch is dropped; the origin replays that step)."""
        if self.stage is not None and self.stage.epoch == frame.epoch:
            self.stage.take_pick(frame)

    def _superseded(self, frame: StepFrame) -> bool:
        newest = self._attempts.get(frame.session, frame.attempt)
        self._attempts[frame.session] = max(newest, frame.attempt)
        return frame.attempt < newest

    async def _refuse(self, frame: StepFrame, code: ErrorCode, message: str) -> None:
        error = ErrorFrame(frame.epoch, frame.session, frame.step, code, message, frame.attempt)
        await self._tell(frame.origin, error)

    # -- KV handoff (this peer as old or new owner) ------------------------------------------

    async def hand_off(self, req: HandoffRequest) -> None:
        """Send the session's cache for the requested units to their new owner."""
        layers = [
            layer
            for unit in range(req.start, min(req.end, self.spec.num_units))
            if (layer := self.spec.layer_of(unit)) is not None
        ]
        async with self._switch:  # mid-switch, caches are between the shard and left-behind
            exported = await run_model(self._export, req.session, layers, req.length)
        refusal = ErrorFrame(req.epoch, req.session, 0, ErrorCode.NO_HANDOFF, "", req.attempt)
        if not exported:
            message = f"{self.control.node} holds no cache of units {req.start}..{req.end - 1}"
            await self._tell(req.origin, replace(refusal, message=message))
            return
        try:
            for i, (layer, keys, values) in enumerate(exported):
                kv = KVFrame(
                    req.epoch,
                    req.session,
                    req.attempt,
                    layer,
                    to_wire(keys),
                    to_wire(values),
                    req.origin,
                    final=i == len(exported) - 1,
                )
                await self._send(req.to, kv)
        except Exception as e:  # the new owner's link failed: the origin replays instead
            await self._tell(req.origin, replace(refusal, message=f"handoff failed: {e}"))
            return
        self.stats.kv_layers_sent += len(exported)
        # Handed over: our copy is no longer anyone's (once we stop serving those layers).
        moved = {layer for layer, _, _ in exported}
        self._handed.setdefault(req.session, set()).update(moved)
        left = self.left_behind.get(req.session)
        if left is not None:
            left.split(moved)
            if not left.layers:
                self.left_behind.drop(req.session)
                self.pulse.fire()

    def _export(
        self, session: str, layers: list[int], length: int
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Copies of the session's cache for `layers`, from wherever this peer holds them."""
        out = []
        shard = self.stage.shard if self.stage is not None else None
        left = self.left_behind.get(session)
        for layer in layers:
            kv = shard.export(session, layer, length) if shard is not None else None
            if kv is None and left is not None and left.has(layer):
                keys, values = left.layer(layer, length)
                kv = (keys.clone(), values.clone())
            if kv is not None:
                out.append((layer, *kv))
        return out

    async def take_kv(self, frame: KVFrame) -> None:
        if self._switch.locked():
            # Mid-switch the new shard is in neither `stage` nor `_pending`: an origin that saw
            # the new chain ready can hand caches over before every stage has switched.
            async with self._switch:
                pass
        stage, pending = self.stage, self._pending
        shard = None
        if stage is not None and stage.epoch == frame.epoch:
            shard = stage.shard
        elif pending is not None and pending.plan.epoch == frame.epoch:
            shard = pending.shard
        refusal = ErrorFrame(frame.epoch, frame.session, 0, ErrorCode.NO_HANDOFF, "", frame.attempt)
        if shard is None:
            message = f"{self.control.node} serves no units in epoch {frame.epoch}"
            await self._tell(frame.origin, replace(refusal, message=message))
            return
        try:
            keys, values = from_wire(frame.keys), from_wire(frame.values)
            await run_model(shard.install, frame.session, frame.layer, keys, values, frame.start)
        except (ValueError, WireError) as e:
            await self._tell(frame.origin, replace(refusal, message=f"bad handoff: {e}"))
            return
        self._seen[frame.session] = (frame.origin, self.clock.now())
        key = (frame.session, frame.attempt)
        if frame.start == 0:  # a layer's first piece (of one, mostly)
            self.stats.kv_layers_received += 1
            self._kv_in[key] = self._kv_in.get(key, 0) + 1
        if frame.final:
            done = HandoffDone(frame.epoch, frame.session, frame.attempt, self._kv_in.pop(key))
            await self._tell(frame.origin, done)

    # -- freeing caches ----------------------------------------------------------------------

    async def forget(self, session: str) -> None:
        """The session is over: free all this peer holds of it, and ignore its late frames."""
        self._seen.pop(session, None)
        self._attempts.pop(session, None)
        self.budget.release(session)
        self._ended[session] = None
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        self.drafter.forget(session)
        if self.stage is not None:
            self.stage.forget_picks(session)
        # Mid-switch a cache is in neither shard nor left-behind list (it is being adopted):
        # a drop then would miss it, and the new shard would keep it until session_idle.
        async with self._switch:
            self.left_behind.drop(session)
            shards = {id(s): s for s in self._shards()}
            for shard in shards.values():
                await run_model(shard.drop, session)
        self.pulse.fire()

    def _shards(self) -> list[Shard]:
        pending = self._pending.shard if self._pending is not None else None
        stage = self.stage.shard if self.stage is not None else None
        return [s for s in (stage, pending) if s is not None]

    async def sweep(self) -> None:
        """One look for what no one will ask for: sessions whose origin left the mesh or went
        quiet, and left-behind caches past their time."""
        await self.clock.sleep(self.timings.sweep_interval)
        if self.left_behind.expire():
            self.pulse.fire()
        now = self.clock.now()
        held = {str(s) for shard in self._shards() for s in shard.sessions}
        for session in held - self._seen.keys():
            self._seen[session] = ("", now)  # learnt by handoff or a race: start a clock
        for session in self._attempts.keys() - self._seen.keys():
            del self._attempts[session]  # refused here before it was served
        for session, (origin, last) in list(self._seen.items()):
            gone = origin and not self.control.is_member_address(origin)
            if gone or now - last > self.timings.session_idle:
                why = "its origin left the mesh" if gone else "it went quiet"
                self.events.add("session", f"freed session {session}: {why}")
                await self.forget(session)
